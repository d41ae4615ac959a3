"""Synthetic 'identities' for evaluation tests: each one a fixed random pattern of blobs.

Images of one identity differ by noise, brightness and a small shift, so a pixel-level
embedding separates identities well and a verification set made of them is meaningful.
"""
import io
import pickle

import numpy as np
from PIL import Image


def identity_template(identity: int, size: int = 112) -> np.ndarray:
    """A smooth random colour pattern, float32 HxWx3 in [0, 255], fixed per identity."""
    rng = np.random.default_rng(1000 + identity)
    coarse = rng.uniform(0, 255, (7, 7, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)


def face_image(identity: int, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One uint8 HxWx3 'photo' of `identity`."""
    img = identity_template(identity, size) * rng.uniform(0.85, 1.15)
    img = np.roll(img, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_pairs(num_pairs: int, num_ids: int = 12, seed: int = 0, size: int = 112):
    """(list of JPEG bytes in pair order, list of bool issame), alternating genuine/impostor."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for i in range(num_pairs):
        a = int(rng.integers(num_ids))
        same = i % 2 == 0
        b = a if same else int((a + rng.integers(1, num_ids)) % num_ids)
        images += [jpeg_bytes(face_image(a, rng, size)), jpeg_bytes(face_image(b, rng, size))]
        issame.append(same)
    return images, issame


def write_bin(path, images, issame, protocol: int = pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=protocol)
    return path


def reference_warp(image: np.ndarray, matrix: np.ndarray, size) -> np.ndarray:
    """Bilinear warp in float64 by explicit sampling (OpenCV convention: output pixel (x, y)
    reads source M^-1 (x, y); black outside). Returns float64 HxWx3."""
    width, height = size
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    src = image.astype(np.float64)
    out = np.zeros((height, width, 3))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < image.shape[1]) & (yi >= 0) & (yi < image.shape[0])
            vals = np.zeros((height, width, 3))
            vals[inside] = src[yi[inside], xi[inside]]
            out += (wx * wy)[..., None] * vals
    return out


def random_similarity(rng, canvas: int, size: int = 112):
    """A random similarity mapping a size x size crop well inside a canvas x canvas image."""
    scale = rng.uniform(0.9, 1.2)
    angle = np.deg2rad(rng.uniform(-15, 15))
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([size / 2, size / 2])
    target = canvas / 2 + rng.uniform(-4, 4, 2)
    return np.hstack([rot, (target - rot @ centre)[:, None]])


def make_ijb_release(root, prefix="ijbc", num_ids=5, templates_per_id=3, seed=0, canvas=176):
    """Write a small IJB release (meta/ + loose_crop/) of synthetic identities.

    Every template holds 2 media of 1-2 faces; faces are identity images placed into a larger
    loose crop by random similarity transforms, with the ArcFace template points carried along as
    their 5 landmarks. Returns a dict describing what was written (identities, transforms...).
    """
    from partial_fc.eval.alignment import ARCFACE_TEMPLATE

    rng = np.random.default_rng(seed)
    meta = root / "meta"
    crops = root / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir()
    faces, template_identity = [], {}
    template_ids = rng.choice(np.arange(1, 10_000), num_ids * templates_per_id, replace=False)
    media_counter = 500
    for t_index, template in enumerate(template_ids):
        identity = t_index % num_ids
        template_identity[int(template)] = identity
        for _ in range(2):
            media_counter += int(rng.integers(1, 7))
            for _ in range(int(rng.integers(1, 3))):
                name = f"{len(faces) + 1}.jpg"
                canonical = face_image(identity, rng)
                transform = random_similarity(rng, canvas)
                loose = np.clip(np.rint(reference_warp(canonical, transform, (canvas, canvas))),
                                0, 255).astype(np.uint8)
                (crops / name).write_bytes(jpeg_bytes(loose, quality=98))
                landmarks = ARCFACE_TEMPLATE @ transform[:, :2].T + transform[:, 2]
                faces.append({"name": name, "template": int(template), "media": media_counter,
                              "landmarks": landmarks, "score": float(rng.uniform(0.5, 1.0)),
                              "identity": identity})
    with open(meta / f"{prefix}_face_tid_mid.txt", "w") as f:
        for face in faces:
            f.write(f"{face['name']} {face['template']} {face['media']}\n")
    with open(meta / f"{prefix}_name_5pts_score.txt", "w") as f:
        for k in rng.permutation(len(faces)):  # another order than the face list: matched by name
            face = faces[k]
            coords = " ".join(f"{v:.6f}" for v in face["landmarks"].reshape(-1))
            f.write(f"{face['name']} {coords} {face['score']:.6f}\n")
    pairs = [(int(a), int(b)) for i, a in enumerate(template_ids) for b in template_ids[i + 1:]]
    with open(meta / f"{prefix}_template_pair_label.txt", "w") as f:
        for k in rng.permutation(len(pairs)):
            a, b = pairs[k]
            f.write(f"{a} {b} {int(template_identity[a] == template_identity[b])}\n")
    return {"faces": faces, "template_identity": template_identity}
