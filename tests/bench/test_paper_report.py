"""bench/paper_report.py on a small held-out set and fake run folders holding real backbones."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from partial_fc.eval import metrics
from partial_fc.models import get_model, save_backbone

from tests.helpers.bench_scripts import load_bench_script

REPO = Path(__file__).resolve().parents[2]


report = load_bench_script("paper_report")


def test_tar_from_roc_is_the_metrics_rule():
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.1
    scores = rng.normal(size=5000) + 1.5 * labels
    fpr, tpr, _ = metrics.roc(scores, labels)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    assert report.tar_from_roc(fpr, tpr, fars) == metrics.tar_at_far(scores, labels, fars)


def test_all_pair_scores_cover_every_unordered_pair_once():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(7, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.array([0, 0, 1, 2, 1, 1, 3])
    scores, same = report.all_pair_scores(emb, ids)
    want = [(float(emb[i] @ emb[j]), ids[i] == ids[j]) for i in range(7) for j in range(i + 1, 7)]
    assert scores.shape == (21,)
    np.testing.assert_allclose(scores, [w[0] for w in want], rtol=0, atol=1e-6)
    assert same.tolist() == [w[1] for w in want] and same.sum() == 4


def test_margin_correlation_of_snapshots():
    c = np.linspace(-0.2, 0.9, 50)
    snaps = [{"step": np.int64(10), "target_cos": c, "margin": 0.4 + 0.1 * c,
              "hard_count": np.full(50, 3.0)},
             {"step": np.int64(20), "target_cos": c, "margin": 0.4 - 0.05 * c ** 2 + 0.01 * c}]
    out = report.margin_correlations(snaps)
    assert out[0]["corr"] == pytest.approx(1.0) and out[0]["hard_count_mean"] == 3.0
    assert out[1]["corr"] == pytest.approx(float(np.corrcoef(snaps[1]["margin"], c)[0, 1]))


def _fake_run(root, head, seed, embedding_seed):
    """A run folder as the trainer leaves it: config, summary, metrics, margins, a checkpoint
    holding a real (untrained) tiny backbone."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["experiment=paper_compare", f"head={head}", f"trainer.seed={seed}"])
    run = Path(root) / f"{head}-seed{seed}"
    ckpt = run / "checkpoints" / "step_00000003"
    torch.manual_seed(embedding_seed)
    kwargs = {"embedding_size": 16, "dropout": 0.0, "activation_checkpointing": False}
    save_backbone(ckpt / "backbone.pt", get_model("tiny", **kwargs), "tiny", kwargs)
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / "summary.json").write_text(json.dumps({"steps": 3}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in (1, 2, 3)))
    if head == "npcface":
        (run / "margins").mkdir()
        rng = np.random.default_rng(seed)
        for step in (1, 3):
            c = rng.uniform(-0.3, 0.8, 32)
            np.savez(run / "margins" / f"step_{step:07d}.npz", step=np.int64(step), target_cos=c,
                     margin=0.4 + 0.2 * rng.uniform(-0.2, 0.5, 32), hard_count=np.ones(32))
    return run


def test_report_end_to_end_on_fake_runs(tmp_path):
    runs = tmp_path / "runs"
    for i, (head, seed) in enumerate([("npcface", 0), ("npcface", 1), ("arcface", 0)]):
        _fake_run(runs, head, seed, embedding_seed=i)
    heldout = tmp_path / "heldout"
    out = tmp_path / "out"
    argv = [str(runs), "--heldout", str(heldout), "--out", str(out), "--num-identities", "8",
            "--num-pairs", "40", "--gallery-images", "60", "--workers", "1"]
    assert report.main(argv) == 0
    result = json.loads((out / "paper_compare.json").read_text())
    assert result["heldout"]["pairs"] == 40 and result["heldout"]["images"] == 80
    assert result["heldout"]["genuine_pairs"] + result["heldout"]["impostor_pairs"] == 60 * 59 // 2
    assert set(result["heads"]) == {"npcface", "arcface"}
    assert result["heads"]["npcface"]["seeds"] == [0, 1]
    for name in ("roc.png", "roc_all_seeds.png", "margin_vs_target_cos.png", "table.md",
                 "target_cos_over_training.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| NPCFace | 2 |" in (out / "table.md").read_text()
    # The per-head numbers are the mean and sample std of the runs' own evaluations, and those
    # agree with the eval package on the same backbone.
    data = report.load_heldout(heldout)
    labels = json.loads((heldout / "labels.json").read_text())
    assert len(labels["identities"]) == 80
    accs = []
    for seed in (0, 1):
        run = [r for r in report.find_runs(runs) if r["head"] == "npcface" and r["seed"] == seed][0]
        from partial_fc.eval.embedding import embed_images
        from partial_fc.models import load_backbone

        emb, _ = embed_images(load_backbone(run["checkpoint"]), data["images"])
        acc, _ = metrics.lfw_accuracy(emb[0::2], emb[1::2], data["issame"])
        accs.append(acc)
        scores, same = report.all_pair_scores(emb[:60], data["identities"][:60])
        tar = metrics.tar_at_far(scores, same, [1e-2])[1e-2]
        cached = json.loads((run["run_dir"] / report.EVAL_CACHE).read_text())["eval"]
        assert cached["acc"] == pytest.approx(acc) and cached["tar_at_far"]["0.01"] == pytest.approx(tar)
    entry = result["heads"]["npcface"]["acc"]
    assert entry["mean"] == pytest.approx(np.mean(accs))
    assert entry["std"] == pytest.approx(np.std(accs, ddof=1))
    assert len(result["margins"]["npcface-seed0"]) == 2
    curve = result["target_cos_curves"]["npcface"]
    assert curve["step"] == [1, 3]
    first = [np.mean(np.load(runs / f"npcface-seed{s}" / "margins" / "step_0000001.npz")["target_cos"])
             for s in (0, 1)]
    assert curve["mean_target_cos"][0] == pytest.approx(np.mean(first))
