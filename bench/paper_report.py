"""Report of the paper comparison (docs/RESULTS.md): evaluate every run of the sweep on one large
held-out set, aggregate over seeds, plot ROCs and NPCFace's per-sample margin against the target
cosine.

    python bench/paper_report.py outputs/paper_compare --heldout data/paper_heldout \
        --out docs/results

The held-out set is generated once (``--heldout``; same population parameters as the runs'
training data, read from their config.yaml, other random streams so no identity is shared):
``heldout.bin`` holds ``num_pairs`` verification pairs (half positive; of the negatives 80% two
look-alikes of one family) and ``labels.json`` the identity of each of its images.

- 1:1 accuracy: the 10-fold protocol on the listed pairs (``partial_fc.eval.metrics.lfw_accuracy``).
- TAR@FAR: ``metrics.tar_at_far``'s rule over *every* pair among the first ``--gallery-images`` images of
  the file (millions of impostor pairs), so FAR 1e-4 and 1e-5 rest on hundreds of false accepts.

Writes ``paper_compare.json`` (every number, per run and per head), ``table.md``, ``roc.png``,
``roc_all_seeds.png``, ``margin_vs_target_cos.png`` and ``target_cos_over_training.png`` into ``--out`` and prints the per-head summary
as JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

HEAD_ORDER = ("npcface", "arcface", "cosface", "mvsoftmax", "curricularface")
HEAD_LABELS = {"npcface": "NPCFace", "arcface": "ArcFace", "cosface": "CosFace",
               "mvsoftmax": "MV-Softmax", "curricularface": "CurricularFace"}
REPORT_FARS = (1e-5, 1e-4, 1e-3, 1e-2)
# Random streams of the held-out set: after the generator's own (0-4), so nothing is shared with
# the training identities or the small heldout.bin the trainer validates on.
_STREAM_IDS, _STREAM_IMAGES, _STREAM_PAIRS = 101, 102, 103


# ---------------------------------------------------------------------------- held-out set
def _render(task):
    from partial_fc.data.synthetic_faces import render_jpeg

    items, jitter = task
    return [render_jpeg(params, words, jitter) for params, words in items]


def make_heldout(out_dir: Path, num_identities: int = 400, num_pairs: int = 6000,
                 family_size: int = 4, family_spread: float = 0.35, jitter: float = 0.7,
                 same_family_negatives: float = 0.8, seed: int = 0, workers: int = 2) -> Path:
    """Write ``heldout.bin`` and ``labels.json`` into ``out_dir`` (kept when the parameters match)."""
    from partial_fc.data.synthetic import plan_pairs
    from partial_fc.eval.bin_format import write_bin
    from partial_fc.data.synthetic_faces import sample_identities

    params = dict(num_identities=num_identities, num_pairs=num_pairs, family_size=family_size,
                  family_spread=family_spread, jitter=jitter,
                  same_family_negatives=same_family_negatives, seed=seed)
    out_dir = Path(out_dir)
    labels_path = out_dir / "labels.json"
    if labels_path.is_file() and (out_dir / "heldout.bin").is_file():
        if json.loads(labels_path.read_text()).get("params") == params:
            return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = sample_identities(-(-num_identities // family_size), family_size,
                            np.random.default_rng([seed, _STREAM_IDS]),
                            family_spread=family_spread)[:num_identities]
    pairs = plan_pairs(num_pairs, num_identities, family_size,
                       np.random.default_rng([seed, _STREAM_PAIRS]), same_family_negatives)
    jobs, identities = [], []
    for p, (a, b, _) in enumerate(pairs):
        jobs += [(ids[a], (seed, _STREAM_IMAGES, p, 0)), (ids[b], (seed, _STREAM_IMAGES, p, 1))]
        identities += [int(a), int(b)]
    chunks = [(jobs[i:i + 64], jitter) for i in range(0, len(jobs), 64)]
    from tqdm import tqdm

    images: List[bytes] = []
    if workers <= 1:
        for batch in tqdm(map(_render, chunks), total=len(chunks), desc="rendering held-out"):
            images += batch
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for batch in tqdm(pool.imap(_render, chunks), total=len(chunks),
                              desc="rendering held-out"):
                images += batch
    write_bin(out_dir / "heldout.bin", images, [s for _, _, s in pairs])
    labels_path.write_text(json.dumps({"params": params, "identities": identities,
                                       "family_size": family_size}) + "\n")
    return out_dir


def load_heldout(heldout_dir: Path) -> Dict:
    """{images: uint8 2N x H x W x 3, issame: [N], identities: [2N] (of each image), params}."""
    from partial_fc.eval.bin_format import load_bin

    heldout_dir = Path(heldout_dir)
    images, issame = load_bin(heldout_dir / "heldout.bin", progress=False)
    labels = json.loads((heldout_dir / "labels.json").read_text())
    identities = np.asarray(labels["identities"], dtype=np.int64)
    if identities.shape[0] != images.shape[0]:
        raise ValueError(f"{heldout_dir}/labels.json: {identities.shape[0]} identities for "
                         f"{images.shape[0]} images")
    return {"images": images, "issame": issame, "identities": identities,
            "params": labels["params"]}


# ---------------------------------------------------------------------------- runs
def find_runs(root: Path) -> List[Dict]:
    """Finished runs under ``root`` (a folder with ``summary.json``, ``config.yaml`` and a final
    checkpoint), each as {head, seed, run_dir, checkpoint, config}."""
    from omegaconf import OmegaConf

    runs = []
    found = sorted(Path(folder) for folder, _, files in os.walk(root, followlinks=True)
                   if "summary.json" in files)
    for run_dir in found:
        config_path = run_dir / "config.yaml"
        latest = run_dir / "checkpoints" / "latest"
        if not config_path.is_file() or not latest.is_file():
            continue
        cfg = OmegaConf.load(config_path)
        checkpoint = run_dir / "checkpoints" / latest.read_text().strip()
        runs.append({"head": str(cfg.head.name), "seed": int(cfg.trainer.seed),
                     "run_dir": run_dir, "checkpoint": checkpoint, "config": cfg})
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json + config.yaml + checkpoint) "
                                f"under {root}")
    return runs


def all_pair_scores(embeddings: np.ndarray, identities: np.ndarray):
    """Cosine similarity and same-identity label of every unordered pair of distinct images."""
    emb = np.asarray(embeddings, dtype=np.float32)
    n = emb.shape[0]
    rows, cols = np.triu_indices(n, k=1)
    sims = emb @ emb.T
    return sims[rows, cols].astype(np.float64), identities[rows] == identities[cols]


def tar_from_roc(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float]) -> Dict[float, float]:
    """``metrics.tar_at_far``'s rule (reversed ROC, nearest FAR, first on ties) applied to a ROC
    already computed, so the all-pairs ROC is built once for the table and the plot."""
    fpr, tpr = np.asarray(fpr)[::-1], np.asarray(tpr)[::-1]
    return {float(far): float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}


def evaluate_embeddings(emb: np.ndarray, issame: np.ndarray, identities: np.ndarray,
                        gallery_images: int, fars: Sequence[float] = REPORT_FARS) -> Dict:
    """Accuracy on the listed pairs and TAR@FAR over all pairs of the first images."""
    from partial_fc.eval import metrics

    acc, std = metrics.lfw_accuracy(emb[0::2], emb[1::2], issame)
    n = min(int(gallery_images), emb.shape[0])
    scores, same = all_pair_scores(emb[:n], identities[:n])
    fpr, tpr, _ = metrics.roc(scores, same)
    tars = tar_from_roc(fpr, tpr, fars)
    # A few hundred points are enough for a log-FAR plot.
    keep = np.unique(np.concatenate([np.searchsorted(fpr, np.logspace(-7, 0, 300)).clip(0, fpr.size - 1),
                                     [0, fpr.size - 1]]))
    return {"acc": acc, "acc_std_folds": std,
            "tar_at_far": {metrics.far_key(f): tars[f] for f in fars},
            "genuine_pairs": int(same.sum()), "impostor_pairs": int((~same).sum()),
            "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}}


EVAL_CACHE = "paper_eval.json"


def evaluate_run(run: Dict, heldout, gallery_images: int, batch_size: int = 256) -> Dict:
    """The run's final backbone on the held-out set; cached in ``<run dir>/paper_eval.json``
    (reused while the checkpoint, the held-out parameters and the gallery size are the same)."""
    from partial_fc.eval.embedding import embed_images
    from partial_fc.models import load_backbone

    key = {"checkpoint": str(run["checkpoint"]), "heldout": heldout["params"],
           "gallery_images": int(gallery_images)}
    cache = Path(run["run_dir"]) / EVAL_CACHE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["eval"]
    model = load_backbone(run["checkpoint"])
    emb, _ = embed_images(model, heldout["images"], batch_size=batch_size, device="cpu")
    result = evaluate_embeddings(emb, heldout["issame"], heldout["identities"], gallery_images)
    cache.write_text(json.dumps({"key": key, "eval": result}) + "\n")
    return result


def aggregate(results: List[Dict]) -> Dict[str, Dict]:
    """Per head: mean and (sample) std over seeds of accuracy and each TAR."""
    heads = {}
    for head in HEAD_ORDER + tuple(sorted({r["head"] for r in results} - set(HEAD_ORDER))):
        rows = [r for r in results if r["head"] == head]
        if not rows:
            continue
        entry = {"seeds": sorted(r["seed"] for r in rows)}
        series = {"acc": [r["eval"]["acc"] for r in rows]}
        for key in rows[0]["eval"]["tar_at_far"]:
            series[f"tar@{key}"] = [r["eval"]["tar_at_far"][key] for r in rows]
        for key, values in series.items():
            values = np.asarray(values, dtype=np.float64)
            entry[key] = {"mean": float(values.mean()),
                          "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                          "values": values.tolist()}
        heads[head] = entry
    return heads


def format_table(heads: Dict[str, Dict], fars: Sequence[str] = ("0.001", "0.0001", "1e-05")) -> str:
    """Markdown table: mean +- std over seeds, in percent."""
    header = ["head", "seeds", "1:1 accuracy (%)"] + [f"TAR@FAR={f} (%)" for f in fars]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for head, entry in heads.items():
        cells = [HEAD_LABELS.get(head, head), str(len(entry["seeds"]))]
        for key in ["acc"] + [f"tar@{f}" for f in fars]:
            cells.append(f"{100 * entry[key]['mean']:.2f} ± {100 * entry[key]['std']:.2f}"
                         if key in entry else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- margins
def load_margin_snapshots(run_dir: Path) -> List[Dict]:
    """The ``margins/step_*.npz`` files of a run (trainer.dump_margins_every), sorted by step."""
    snapshots = []
    for path in sorted(Path(run_dir).glob("margins/step_*.npz")):
        with np.load(path) as data:
            snapshots.append({k: data[k] for k in data.files})
    return sorted(snapshots, key=lambda s: int(s["step"]))


def margin_correlations(snapshots: List[Dict]) -> List[Dict]:
    """Per snapshot: Pearson correlation of m_i with c_y, mean m_i, mean c_y, mean hard count."""
    out = []
    for snap in snapshots:
        if "margin" not in snap:
            continue
        m, c = np.asarray(snap["margin"]), np.asarray(snap["target_cos"])
        corr = float(np.corrcoef(m, c)[0, 1]) if m.std() > 0 and c.std() > 0 else float("nan")
        out.append({"step": int(snap["step"]), "corr": corr, "margin_mean": float(m.mean()),
                    "target_cos_mean": float(c.mean()),
                    "hard_count_mean": float(np.mean(snap.get("hard_count", np.nan)))})
    return out


def plot_margins(snapshots: List[Dict], path: Path, m0: float, title: str) -> Path:
    """Scatter of m_i against c_y, one colour per training step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [s for s in snapshots if "margin" in s]
    colors = _step_colors(len(steps))
    for color, snap in zip(colors, steps):
        ax.scatter(snap["target_cos"], snap["margin"], s=7, alpha=0.6, color=color,
                   label=f"step {int(snap['step'])}")
    ax.axhline(m0, color="grey", lw=0.8, ls="--", label=f"m0 = {m0:g}")
    ax.set_xlabel("target cosine c_y")
    ax.set_ylabel("collaborative margin m_i")
    ax.set_title(title)
    ax.grid(True, linestyle=":", linewidth=0.5)
    ax.legend(loc="best", fontsize=7, markerscale=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def target_cos_curves(runs: List[Dict]) -> Dict[str, Dict[str, List[float]]]:
    """Per head: the training batches' mean target cosine at each snapshot step, averaged over
    the head's runs that have snapshots (how far training pulled samples to their centres)."""
    per_head: Dict[str, Dict[int, List[float]]] = {}
    for run in runs:
        for snap in load_margin_snapshots(run["run_dir"]):
            steps = per_head.setdefault(run["head"], {})
            steps.setdefault(int(snap["step"]), []).append(float(np.mean(snap["target_cos"])))
    return {head: {"step": sorted(steps), "mean_target_cos": [float(np.mean(steps[k]))
                                                              for k in sorted(steps)]}
            for head, steps in per_head.items()}


def plot_target_cos(curves: Dict[str, Dict[str, List[float]]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for head in sorted(curves, key=lambda h: HEAD_ORDER.index(h) if h in HEAD_ORDER else 99):
        ax.plot(curves[head]["step"], curves[head]["mean_target_cos"], marker="o", ms=3,
                label=HEAD_LABELS.get(head, head))
    ax.set_xlabel("training step")
    ax.set_ylabel("mean target cosine c_y of the batch")
    ax.set_title("How far each head pulls samples to their class centres")
    ax.grid(True, linestyle=":", linewidth=0.5)
    ax.legend(loc="best", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _step_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the sweep folder (e.g. outputs/paper_compare)")
    parser.add_argument("--heldout", type=Path, default=Path("data/paper_heldout"),
                        help="folder of the held-out set (generated there when missing)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--num-identities", type=int, default=400)
    parser.add_argument("--num-pairs", type=int, default=6000)
    parser.add_argument("--gallery-images", type=int, default=5000,
                        help="TAR@FAR over all pairs among this many images of the held-out file")
    parser.add_argument("--margin-run", default="npcface-seed0",
                        help="run folder name whose margin snapshots are plotted")
    parser.add_argument("--workers", type=int, default=2)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from partial_fc.eval.plots import plot_roc

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.workers))
    runs = find_runs(args.runs)
    syn = runs[0]["config"].data.synthetic
    heldout = make_heldout(args.heldout, num_identities=args.num_identities,
                           num_pairs=args.num_pairs, family_size=int(syn.family_size),
                           family_spread=float(syn.family_spread), jitter=float(syn.jitter),
                           same_family_negatives=float(syn.same_family_negatives),
                           seed=int(syn.seed), workers=args.workers)
    data = load_heldout(heldout)
    images, issame = data["images"], data["issame"]
    from tqdm import tqdm

    results = []
    for run in tqdm(runs, desc="evaluating runs"):
        result = evaluate_run(run, data, args.gallery_images)
        metrics_path = run["run_dir"] / "metrics.jsonl"
        last = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        train_losses = [r["loss"] for r in last if "loss" in r]
        results.append({"head": run["head"], "seed": run["seed"], "run_dir": str(run["run_dir"]),
                        "checkpoint": str(run["checkpoint"]),
                        "final_train_loss": train_losses[-1] if train_losses else None,
                        "eval": result})
    heads = aggregate(results)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    first = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        first.setdefault(r["head"], r)
    plot_roc({f"{HEAD_LABELS.get(h, h)} (seed {r['seed']})":
              (np.asarray(r["eval"]["roc"]["fpr"]), np.asarray(r["eval"]["roc"]["tpr"]))
              for h, r in sorted(first.items(), key=lambda kv: HEAD_ORDER.index(kv[0])
                                 if kv[0] in HEAD_ORDER else 99)},
             out / "roc.png", title="Held-out synthetic families: all-pairs ROC")
    plot_roc({f"{HEAD_LABELS.get(r['head'], r['head'])} s{r['seed']}":
              (np.asarray(r["eval"]["roc"]["fpr"]), np.asarray(r["eval"]["roc"]["tpr"]))
              for r in results}, out / "roc_all_seeds.png", title="All runs")

    margins = {}
    for run in runs:
        if run["head"] != "npcface":
            continue
        snaps = load_margin_snapshots(run["run_dir"])
        margins[run["run_dir"].name] = margin_correlations(snaps)
        if run["run_dir"].name == args.margin_run and snaps:
            plot_margins(snaps, out / "margin_vs_target_cos.png", float(run["config"].head.m0),
                         f"NPCFace m_i vs c_y over training ({run['run_dir'].name})")

    curves = target_cos_curves(runs)
    if curves:
        plot_target_cos(curves, out / "target_cos_over_training.png")

    example = results[0]["eval"]
    report = {"heldout": {"dir": str(heldout), "pairs": int(issame.size),
                          "images": int(images.shape[0]),
                          "gallery_images": min(args.gallery_images, int(images.shape[0])),
                          "genuine_pairs": example["genuine_pairs"],
                          "impostor_pairs": example["impostor_pairs"]},
              "heads": heads, "margins": margins, "target_cos_curves": curves,
              "runs": [{**r, "eval": {k: v for k, v in r["eval"].items() if k != "roc"}}
                       for r in results]}
    (out / "paper_compare.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "table.md").write_text(format_table(heads) + "\n")
    print(json.dumps({"heldout": report["heldout"],
                      "heads": {h: {k: (v["mean"], v["std"]) for k, v in e.items() if k != "seeds"}
                                for h, e in heads.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
