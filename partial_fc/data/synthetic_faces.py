"""A procedural face renderer: identity parameter vectors -> 112x112 face-like pictures.

An identity is a vector of named parameters (face shape, skin tone, hair, eyes, brows, nose, mouth,
ears, facial hair, glasses, a mole...). Identities come in *families*: members share a family base
and differ by a fraction (``family_spread``) of the population spread, so look-alikes exist and a
verification set can draw hard negatives within families. Every rendered image jitters pose (roll,
yaw, pitch), scale, position, lighting, expression, background, blur, noise, an occluder and JPEG
quality; ``jitter`` scales all of these together.

Everything is drawn with soft-edged ellipses composited in numpy, only within each shape's
bounding box, so one picture costs about a millisecond. Deterministic: an image depends only on
its identity vector and the seed words it is rendered with.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
from PIL import Image

__all__ = ["IDENTITY_PARAMS", "sample_identities", "render_face", "render_jpeg", "encode_jpeg", "jpeg_quality"]

SIZE = 112
_CENTER = SIZE / 2.0

# name: (low, high) of the population prior (uniform). Units are pixels of the 112x112 aligned
# crop, relative to its centre (y down), unless noted. Traits (prob_*) are drawn per identity.
IDENTITY_PARAMS: Dict[str, tuple] = {
    "face_rx": (33.0, 42.0),
    "face_ry": (45.0, 55.0),
    "face_cy": (3.0, 9.0),
    "jaw_ratio": (0.68, 0.98),      # lower-face width relative to face_rx
    "chin_drop": (0.0, 8.0),
    "skin_t": (0.0, 1.0),           # light .. dark along the skin palette
    "skin_warm": (-1.0, 1.0),
    "hair_t": (0.0, 1.0),           # position along the hair palette
    "hair_line": (-36.0, -20.0),
    "hair_volume": (1.0, 12.0),
    "hair_side": (0.0, 1.0),        # how far hair comes down the sides (long hair)
    "hair_part": (-14.0, 14.0),
    "eye_y": (-9.0, 0.0),
    "eye_dx": (14.5, 21.0),
    "eye_rx": (4.8, 8.0),
    "eye_ry": (2.2, 4.2),
    "eye_tilt": (-0.22, 0.22),
    "iris_t": (0.0, 1.0),
    "brow_gap": (5.0, 10.5),
    "brow_thick": (1.4, 3.8),
    "brow_len": (8.0, 15.0),
    "brow_angle": (-0.35, 0.35),
    "brow_dark": (0.3, 1.0),
    "nose_len": (11.0, 22.0),
    "nose_w": (5.0, 12.0),
    "nose_shade": (0.05, 0.22),
    "mouth_y": (28.0, 39.0),
    "mouth_w": (8.0, 15.5),
    "lip_thick": (1.8, 5.0),
    "lip_red": (0.0, 1.0),
    "ear_size": (5.0, 10.0),
    "ear_y": (-6.0, 6.0),
    "blush": (0.0, 0.35),
    "mole_x": (-24.0, 24.0),
    "mole_y": (-20.0, 30.0),
    "beard": (0.0, 1.0),            # > 0.72: beard
    "mustache": (0.0, 1.0),         # > 0.70: mustache
    "glasses": (0.0, 1.0),          # > 0.86: glasses
    "mole": (0.0, 1.0),             # > 0.65: a mole
    "glasses_t": (0.0, 1.0),
}
_NAMES = tuple(IDENTITY_PARAMS)
_LOW = np.array([IDENTITY_PARAMS[n][0] for n in _NAMES])
_HIGH = np.array([IDENTITY_PARAMS[n][1] for n in _NAMES])
# Traits a family member usually inherits whole, rather than getting a perturbed copy of.
_TRAITS = ("beard", "mustache", "glasses", "mole")
_COLOUR_PARAMS = ("skin_t", "skin_warm", "hair_t", "iris_t", "lip_red", "brow_dark", "glasses_t")

_SKIN = np.array([[241, 206, 180], [222, 176, 143], [190, 140, 105], [150, 102, 72], [100, 66, 46]], float)
_HAIR = np.array([[25, 20, 18], [60, 40, 28], [105, 70, 40], [170, 130, 80], [215, 185, 125],
                  [150, 70, 35], [150, 150, 150]], float)
_IRIS = np.array([[70, 45, 25], [110, 75, 40], [60, 100, 150], [80, 120, 80], [110, 110, 120]], float)
_GLASSES = np.array([[20, 20, 20], [120, 80, 40], [180, 180, 190], [150, 30, 30]], float)


def _palette(table: np.ndarray, t: float) -> np.ndarray:
    pos = min(max(t, 0.0), 1.0) * (len(table) - 1)
    i = min(int(pos), len(table) - 2)
    f = pos - i
    return table[i] * (1 - f) + table[i + 1] * f


def sample_identities(
    num_families: int,
    family_size: int,
    rng: np.random.Generator,
    family_spread: float = 0.5,
    colour_spread: float = 1.0,
) -> np.ndarray:
    """Identity vectors ``[num_families * family_size, len(IDENTITY_PARAMS)]``, families contiguous.

    A family draws a base from the prior; each member moves every shape parameter by
    ``N(0, family_spread * prior range / 2)`` and every colour parameter by ``colour_spread``
    times that (clipped to the prior), and inherits each trait with probability 0.85 (else
    redraws it). (Measured with the tiny CPU model: families that share their colours and differ
    only in shape, colour_spread=0.4, were not separated within a few hundred steps.)
    """
    d = len(_NAMES)
    base = rng.uniform(_LOW, _HIGH, size=(num_families, d))
    members = np.repeat(base, family_size, axis=0)
    if family_size > 1:
        scale = np.array([colour_spread if n in _COLOUR_PARAMS else 1.0 for n in _NAMES])
        noise = rng.normal(0.0, 1.0, size=members.shape) * (family_spread * scale * (_HIGH - _LOW) / 2)
        members = np.clip(members + noise, _LOW, _HIGH)
        trait_cols = [_NAMES.index(t) for t in _TRAITS]
        redraw = rng.random((members.shape[0], len(trait_cols))) > 0.85
        fresh = rng.uniform(0.0, 1.0, size=redraw.shape)
        cols = members[:, trait_cols]
        cols[redraw] = fresh[redraw]
        members[:, trait_cols] = cols
    return members


@dataclass
class FaceStyle:
    """Colours derived from an identity vector."""

    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lip: np.ndarray
    brow: np.ndarray
    glasses: np.ndarray


def _style(p: Dict[str, float]) -> FaceStyle:
    skin = _palette(_SKIN, p["skin_t"]) + p["skin_warm"] * np.array([8.0, 0.0, -8.0])
    hair = _palette(_HAIR, p["hair_t"])
    lip = skin * (0.85 - 0.1 * p["lip_red"]) + np.array([40.0, -5.0, 0.0]) * (0.5 + p["lip_red"])
    brow = hair * (1.0 - 0.55 * p["brow_dark"]) + skin * 0.05
    return FaceStyle(skin=_rgb(skin), hair=_rgb(hair), iris=_rgb(_palette(_IRIS, p["iris_t"])),
                     lip=_rgb(lip), brow=_rgb(brow), glasses=_rgb(_palette(_GLASSES, p["glasses_t"])))


_RAMP = np.arange(256, dtype=np.float32)
_RAMP_COL = _RAMP[:, None]


class _Canvas:
    """A planar float32 3xHxW picture with soft-edged, rotated ellipses composited in place.

    Coordinates are given in pixels of the 112x112 output; a canvas with ``scale=0.5`` draws
    at half resolution (used for the large, smooth shapes, which dominate the pixel work).
    """

    def __init__(self, image: np.ndarray, scale: float = 1.0):
        self.img = image
        _, self.h, self.w = image.shape
        self.scale = scale

    def ellipse(self, cx, cy, rx, ry, angle, color, alpha=1.0, soft=1.0, cut_above=None,
                cut_below=None, ring=None):
        """Paint an ellipse centred at (cx, cy) with radii (rx, ry), rotated by ``angle``.

        ``color`` is a float32 array of shape (3, 1, 1) (see ``_rgb``). ``soft`` is the edge
        width. ``cut_above``/``cut_below`` keep only the part above/below the line at that local
        v (ellipse frame, y down, output pixels); ``ring`` keeps the part outside that fraction
        of the radius.
        """
        k0 = self.scale
        if k0 != 1.0:
            cx, cy, rx, ry, soft = (cx + 0.5) * k0 - 0.5, (cy + 0.5) * k0 - 0.5, rx * k0, ry * k0, soft * k0
            cut_above = None if cut_above is None else cut_above * k0
            cut_below = None if cut_below is None else cut_below * k0
        if soft < 0.5:
            soft = 0.5
        if rx <= 0.1 or ry <= 0.1 or alpha <= 0:
            return
        c, s = math.cos(angle), math.sin(angle)
        hw = math.sqrt((rx * c) ** 2 + (ry * s) ** 2) + 2.0 * soft
        hh = math.sqrt((rx * s) ** 2 + (ry * c) ** 2) + 2.0 * soft
        x0, x1 = max(int(cx - hw), 0), min(int(cx + hw) + 2, self.w)
        y0, y1 = max(int(cy - hh), 0), min(int(cy + hh) + 2, self.h)
        if x0 >= x1 or y0 >= y1:
            return
        dx = _RAMP[: x1 - x0] + (x0 - cx)
        dy = _RAMP_COL[: y1 - y0] + (y0 - cy)
        r_eff = math.sqrt(rx * ry)
        if ring is None and cut_above is None and cut_below is None:
            # Edge from the quadratic form, (1 - d^2) / 2 ~ (1 - d) near the rim, split into a
            # row term, a column term and (when rotated) one outer product.
            irx2, iry2 = 1.0 / (rx * rx), 1.0 / (ry * ry)
            k = r_eff / (2.0 * soft)
            row = dx * dx
            row *= -(c * c * irx2 + s * s * iry2) * k
            row += k + 0.5
            col_term = dy * dy
            col_term *= -(s * s * irx2 + c * c * iry2) * k
            qb = 2.0 * c * s * (irx2 - iry2) * k
            if qb > 1e-9 or qb < -1e-9:
                m = (dy * -qb) * dx
                m += row
                m += col_term
            else:
                m = row + col_term
            np.minimum(m, 1.0, out=m)
            np.maximum(m, 0.0, out=m)
        else:
            u = (dx * c + dy * s) * (1.0 / rx)
            vr = dy * c - dx * s  # v * ry
            v = vr * (1.0 / ry)
            d = np.sqrt(u * u + v * v)
            m = np.clip((1.0 - d) * (r_eff / soft) + 0.5, 0.0, 1.0)
            if ring is not None:
                m *= np.clip((d - ring) * (r_eff / soft) + 0.5, 0.0, 1.0)
            if cut_above is not None:  # keep v * ry <= cut_above
                m *= np.clip((cut_above - vr) * (1.0 / soft) + 0.5, 0.0, 1.0)
            if cut_below is not None:  # keep v * ry >= cut_below
                m *= np.clip((vr - cut_below) * (1.0 / soft) + 0.5, 0.0, 1.0)
        if alpha != 1.0:
            m *= alpha
        region = self.img[:, y0:y1, x0:x1]
        delta = color - region
        delta *= m
        region += delta


def _rgb(values) -> np.ndarray:
    """A colour as the float32 (3, 1, 1) array that ``_Canvas.ellipse`` blends with."""
    return np.asarray(values, dtype=np.float32).reshape(3, 1, 1)


_BLUSH = _rgb((220.0, 90.0, 90.0))
_SCLERA = _rgb((238.0, 236.0, 230.0))
_PUPIL = _rgb((15.0, 12.0, 12.0))
_MOUTH_INSIDE = _rgb((60.0, 20.0, 25.0))


def _upsample2(img: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling of a 3xHxW float32 array (pixel-centre aligned, edges clamped)."""
    c, h, w = img.shape
    q = img * np.float32(0.25)
    wide = np.empty((c, h, 2 * w), dtype=np.float32)
    even, odd = wide[:, :, 0::2], wide[:, :, 1::2]
    np.subtract(img, q, out=even)          # 0.75 * x
    odd[...] = even
    even[:, :, 1:] += q[:, :, :-1]
    even[:, :, 0] += q[:, :, 0]
    odd[:, :, :-1] += q[:, :, 1:]
    odd[:, :, -1] += q[:, :, -1]
    q = wide * np.float32(0.25)
    out = np.empty((c, 2 * h, 2 * w), dtype=np.float32)
    even, odd = out[:, 0::2], out[:, 1::2]
    np.subtract(wide, q, out=even)
    odd[...] = even
    even[:, 1:] += q[:, :-1]
    even[:, 0] += q[:, 0]
    odd[:, :-1] += q[:, 1:]
    odd[:, -1] += q[:, -1]
    return out


def _blur3(img: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur of a 3xHxW float32 array by repeated 3-tap passes per axis."""
    passes = max(1, int(math.ceil((sigma / 0.8) ** 2)))
    w = np.float32(min(sigma * sigma / (2.0 * passes), 1.0 / 3.0))
    for _ in range(passes):
        for axis in (1, 2):
            lo = np.take(img, np.r_[0, 0 : img.shape[axis] - 1], axis=axis)
            hi = np.take(img, np.r_[1 : img.shape[axis], img.shape[axis] - 1], axis=axis)
            lo += hi
            lo *= w
            img *= np.float32(1.0) - 2 * w
            img += lo
    return img


_NOISE_BANK = None


def _noise_bank() -> np.ndarray:
    """A fixed block of standard normal noise (per process, from a constant seed) that images
    take random windows of: much cheaper than fresh normals per image, and deterministic."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(12345).standard_normal((3, 2 * SIZE, 2 * SIZE), dtype=np.float32)
    return _NOISE_BANK


def _gaussian(rng, sigma):
    return float(rng.normal(0.0, sigma)) if sigma > 0 else 0.0


def render_face(params: np.ndarray, rng: np.random.Generator, jitter: float = 1.0) -> np.ndarray:
    """Render one picture of the identity ``params`` with image-level jitter drawn from ``rng``.

    Returns a uint8 112x112x3 RGB array. ``jitter`` scales pose, scale, shift, lighting,
    expression, blur, noise and occluder probability (0 gives a frontal, clean picture).
    """
    p = dict(zip(_NAMES, params.tolist()))
    st = _style(p)
    j = float(jitter)

    # --- image-level draws (pose, lighting, expression)
    roll = _gaussian(rng, 0.12 * j)
    yaw = float(np.clip(rng.normal(0.0, 0.35 * j), -0.8, 0.8)) if j > 0 else 0.0
    pitch = _gaussian(rng, 0.12 * j)
    scale = 1.0 + _gaussian(rng, 0.06 * j)
    shift_x, shift_y = _gaussian(rng, 2.5 * j), _gaussian(rng, 2.5 * j)
    smile = float(rng.uniform(-0.3, 1.0)) * min(j, 1.0)
    mouth_open = float(rng.random() ** 2) * min(j, 1.0)
    eye_open = 0.15 if rng.random() < 0.04 * j else float(rng.uniform(0.75, 1.1)) if j > 0 else 1.0
    brow_raise = _gaussian(rng, 1.5 * j)
    hair_jit = _gaussian(rng, 1.5 * j)
    cr, sr = math.cos(roll), math.sin(roll)

    def to_px(x, y, depth=0.0):
        """Canonical face point (px from centre) at ``depth`` (px in front of the outline)."""
        x = x * (1.0 - 0.25 * abs(yaw)) + yaw * depth
        y = y + pitch * depth
        return (_CENTER - 0.5 + shift_x + scale * (x * cr - y * sr),
                _CENTER - 0.5 + shift_y + scale * (x * sr + y * cr))

    def ell(canvas, x, y, rx, ry, angle, color, depth=0.0, side=0.0, **kw):
        cx, cy = to_px(x, y, depth)
        # the far side of a turned face looks narrower
        squeeze = 1.0 - 0.3 * max(0.0, yaw * side) if side else 1.0 - 0.15 * abs(yaw)
        canvas.ellipse(cx, cy, rx * scale * squeeze, ry * scale, angle + roll, color, **kw)

    # --- coarse layer (half resolution): background, head, hair
    half = SIZE // 2
    # background: a ramp between two random colours, unrelated to the identity
    bg_a = rng.uniform(20, 235, size=3).astype(np.float32)
    bg_b = rng.uniform(20, 235, size=3).astype(np.float32)
    t = (_RAMP[:half] + 0.5) * np.float32(1.0 / half)
    grad = t[:, None] if rng.random() < 0.5 else t[None, :]
    coarse = np.empty((3, half, half), dtype=np.float32)
    for ch in range(3):
        coarse[ch] = bg_a[ch] + grad * (bg_b[ch] - bg_a[ch])
    cv = _Canvas(coarse, scale=0.5)

    fy = p["face_cy"]
    frx, fry = p["face_rx"], p["face_ry"]
    skin, hair = st.skin, st.hair
    has_hair = p["hair_t"] > 0.02 or p["hair_line"] < -21.0
    if has_hair and p["hair_side"] > 0.35:  # long hair behind the head
        length = (p["hair_side"] - 0.35) / 0.65
        ell(cv, 0.0, fy - 6 + 14 * length, frx + p["hair_volume"] + 3, fry * (0.8 + 0.45 * length), 0.0,
            hair * 0.85, depth=-8.0, soft=2.0)
    ell(cv, 0.0, fy + fry * 0.95, frx * 0.55, fry * 0.45, 0.0, skin * 0.8, depth=-6.0, soft=2.0)
    for side in (-1.0, 1.0):
        ell(cv, side * (frx * 0.98), p["ear_y"] + fy - 6, p["ear_size"] * 0.6, p["ear_size"], side * 0.15,
            skin * 0.92, depth=-10.0, side=side, soft=2.0)
    ell(cv, 0.0, fy, frx, fry * 0.82, 0.0, skin, soft=2.0)
    ell(cv, 0.0, fy + 8 + p["chin_drop"] * 0.5, frx * p["jaw_ratio"], fry * 0.75 + p["chin_drop"] * 0.4,
        0.0, skin, soft=2.0)
    if p["blush"] > 0.05:
        for side in (-1.0, 1.0):
            ell(cv, side * p["eye_dx"] * 1.05, fy + 16, 7.0, 5.0, 0.0, _BLUSH,
                depth=6.0, alpha=p["blush"], soft=4.0, side=side)
    if has_hair:
        line = p["hair_line"] + hair_jit - fy
        ell(cv, 0.0, fy - 2, frx + p["hair_volume"] * 0.5 + 1.0, fry * 0.84 + p["hair_volume"] * 0.6,
            0.0, hair, depth=-2.0, cut_above=line, soft=2.0)
        ell(cv, p["hair_part"], p["hair_line"] - 2 + hair_jit, frx * 0.55, 9.0,
            0.25 * math.copysign(1.0, p["hair_part"]), hair, soft=2.0)
        if p["hair_side"] > 0.55:  # side locks over the temples
            for side in (-1.0, 1.0):
                ell(cv, side * (frx - 2), fy - 8, 5.0, fry * 0.4 * p["hair_side"], 0.0, hair,
                    depth=-4.0, side=side, soft=2.0)
    my = p["mouth_y"]
    if p["beard"] > 0.72:
        ell(cv, 0.0, fy + 10 + p["chin_drop"] * 0.5, frx * p["jaw_ratio"] + 1,
            fry * 0.76 + p["chin_drop"] * 0.4, 0.0, hair * 0.9, depth=1.0, alpha=0.85,
            cut_below=my - fy - 14, soft=2.0)

    # --- fine layer (full resolution): eyes, brows, nose, mouth, accessories
    fine = _Canvas(_upsample2(coarse))
    ey = p["eye_y"]
    for side in (-1.0, 1.0):
        ex = side * p["eye_dx"]
        tilt = side * p["eye_tilt"]
        ell(fine, ex, ey, p["eye_rx"] + 1.2, p["eye_ry"] + 1.6, tilt, skin * 0.72, depth=6.0,
            alpha=0.5, soft=2.0, side=side)
        ry = max(p["eye_ry"] * eye_open, 0.4)
        ell(fine, ex, ey, p["eye_rx"], ry, tilt, _SCLERA, depth=8.0, side=side)
        if eye_open > 0.3:
            ir = p["eye_ry"] * 0.95
            ell(fine, ex + yaw * 1.5, ey, ir, min(ir, ry), 0.0, st.iris, depth=9.0, side=side)
            ell(fine, ex + yaw * 1.5, ey, ir * 0.45, min(ir * 0.45, ry), 0.0, _PUPIL,
                depth=9.0, side=side)
        ell(fine, ex, ey - p["brow_gap"] - brow_raise, p["brow_len"] * 0.5, p["brow_thick"],
            side * p["brow_angle"], st.brow, depth=8.0, side=side)
    nl, nw = p["nose_len"], p["nose_w"]
    ell(fine, -1.5, ey + 4 + nl * 0.5, nw * 0.3, nl * 0.55, 0.0, skin * (1 - p["nose_shade"]),
        depth=12.0, alpha=0.7, soft=2.0)
    ell(fine, 0.0, ey + 4 + nl, nw * 0.55, nw * 0.33, 0.0, skin * 1.04, depth=14.0, alpha=0.7, soft=1.5)
    for side in (-1.0, 1.0):
        ell(fine, side * nw * 0.32, ey + 5 + nl, nw * 0.16, nw * 0.1, 0.0, skin * 0.45, depth=13.0)
    mw = p["mouth_w"] * (1.0 + 0.15 * smile)
    if p["mustache"] > 0.70:
        ell(fine, 0.0, my - p["lip_thick"] - 2.5, mw * 1.05, 2.6, 0.0, hair * 0.9, depth=9.0)
    lt = p["lip_thick"]
    ell(fine, 0.0, my, mw, lt + mouth_open * 3.0, 0.0, st.lip, depth=8.0)
    if mouth_open > 0.25:
        ell(fine, 0.0, my + 0.5, mw * 0.7, mouth_open * 3.0, 0.0, _MOUTH_INSIDE, depth=8.0)
    else:
        ell(fine, 0.0, my, mw * 0.95, 0.7, 0.0, st.lip * 0.55, depth=8.5)
    if smile > 0.3:  # dimples at the corners of a smile
        for side in (-1.0, 1.0):
            ell(fine, side * (mw + 1.0), my - 1.5, 1.2, 2.2, side * 0.5, skin * 0.7, depth=7.5,
                alpha=smile * 0.8)
    if p["mole"] > 0.65:
        ell(fine, p["mole_x"], p["mole_y"], 1.4, 1.4, 0.0, skin * 0.35, depth=6.0)
    if p["glasses"] > 0.86:
        gr = 7.0 + 3.0 * p["glasses_t"]
        for side in (-1.0, 1.0):
            ell(fine, side * p["eye_dx"], ey + 0.5, gr, gr * 0.78, 0.0, st.glasses, depth=11.0,
                ring=0.82, side=side)
        ell(fine, 0.0, ey - 1.0, p["eye_dx"] - gr + 1.5, 1.0, 0.0, st.glasses, depth=12.0)

    # occluder: a mask, sunglasses or an object over part of the face
    if rng.random() < 0.25 * min(j, 2.0):
        kind = rng.random()
        color = _rgb(rng.uniform(10, 245, size=3))
        if kind < 0.3:
            ell(fine, 0.0, my + 4, frx * 0.85, 15.0, 0.0, color, depth=9.0, cut_below=-8.0)
        elif kind < 0.5:
            for side in (-1.0, 1.0):
                ell(fine, side * p["eye_dx"], ey, 9.0, 6.5, 0.0, color * 0.3, depth=11.0, side=side)
        else:
            fine.ellipse(_CENTER + rng.uniform(-35, 35), _CENTER + rng.uniform(-30, 45),
                         rng.uniform(8, 22), rng.uniform(8, 22), rng.uniform(0, math.pi), color)

    img = fine.img
    # lighting: gain, per-channel cast and a directional gradient, in one multiply
    gain = float(np.clip(1.0 + rng.normal(0.0, 0.18 * j), 0.45, 1.6))
    cast = (gain * (1.0 + rng.normal(0.0, 0.05 * j, size=3))).astype(np.float32)
    ang = rng.uniform(0.0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.35 * j)
    tt = (_RAMP[:SIZE] + np.float32(0.5 - SIZE / 2)) * np.float32(2.0 / SIZE)
    shade = (tt * np.float32(strength * math.cos(ang)))[None, :] + (tt * np.float32(strength * math.sin(ang)))[:, None]
    shade += np.float32(1.0)
    img *= shade * cast[:, None, None]
    noise_sigma = rng.uniform(0.0, 6.0 * j)
    if noise_sigma > 0.5:
        bank = _noise_bank()
        oy, ox = rng.integers(0, SIZE, size=2)
        img += bank[:, oy : oy + SIZE, ox : ox + SIZE] * np.float32(noise_sigma)
    blur = rng.uniform(0.0, 1.3 * j) if rng.random() < 0.5 else 0.0
    if blur > 0.25:
        img = _blur3(img, blur)
    np.clip(img, 0.0, 255.0, out=img)
    return img.transpose(1, 2, 0).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG-encode a uint8 HxWx3 RGB array with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_quality(rng: np.random.Generator, jitter: float) -> int:
    """Per-image JPEG quality: from 95 down to about 95 - 50 * jitter."""
    low = max(95 - int(50 * min(jitter, 1.5)), 20)
    return int(rng.integers(low, 96))


def render_jpeg(params: np.ndarray, seed_words: Sequence[int], jitter: float = 1.0) -> bytes:
    """Render and JPEG-encode one image; ``seed_words`` fix the image-level randomness."""
    rng = np.random.default_rng(list(seed_words))
    image = render_face(params, rng, jitter)
    return encode_jpeg(image, jpeg_quality(rng, jitter))
