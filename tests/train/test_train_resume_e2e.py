"""End to end through torchrun: stop and resume equals an uninterrupted run; resume on 3 ranks."""
import json
from pathlib import Path

import pytest

from tests.helpers.e2e import losses_by_step, metrics, run_train

COMMON = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.log_every=1",
          "trainer.deterministic=true", "trainer.val_every=0", "trainer.progress_bar=false",
          "run_name=r"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def _check_outputs(run_dir):
    records = [r for r in metrics(run_dir) if "loss" in r]
    for key in ("loss", "lr", "samples_per_sec", "grad_norm", "skipped_steps", "npc/margin_mean",
                "npc/margin_std", "npc/hard_negatives_mean"):
        assert all(key in r for r in records), key
    assert any("val/heldout/acc" in r for r in metrics(run_dir))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "head:" in (run_dir / "config.yaml").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 2
    assert (run_dir / "checkpoints" / "step_00000008" / "backbone.pt").is_file()
    # The in-training validation (sharded over ranks) scores exactly the saved backbone.
    from partial_fc.eval import evaluate_bins
    from partial_fc.models import load_backbone

    backbone = load_backbone(run_dir / "checkpoints" / "step_00000008")
    heldout = Path(summary["dataset"]) / "heldout.bin"
    offline = evaluate_bins(backbone, [heldout], batch_size=16)["heldout"]["acc"]
    logged = [r["val/heldout/acc"] for r in metrics(run_dir) if r.get("step") == 8 and "val/heldout/acc" in r]
    assert logged == [pytest.approx(offline, abs=1e-9)]


def test_stop_resume_equals_uninterrupted_and_reshards_to_three_ranks(tmp_path, cache):
    run_train(2, [*COMMON, f"output_root={tmp_path / 'a'}"], cache)
    straight = losses_by_step(tmp_path / "a" / "r")
    assert sorted(straight) == list(range(1, 9))
    _check_outputs(tmp_path / "a" / "r")

    run_train(2, [*COMMON, "trainer.stop_at=4", f"output_root={tmp_path / 'b'}"], cache)
    run_dir = tmp_path / "b" / "r"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4]
    run_train(2, [*COMMON, f"output_root={tmp_path / 'b'}"], cache)  # trainer.resume=auto
    resumed = losses_by_step(run_dir)
    assert resumed == straight  # bit-identical in deterministic mode
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == sorted(set(steps)), "one record per step"
    # validation ran at step 0 and at the end of each of the two runs, in the same file
    val_steps = [r["step"] for r in metrics(run_dir) if "val/heldout/acc" in r]
    assert val_steps == [0, 4, 8]

    # The step-4 checkpoint of the 2-rank run continues on 3 ranks.
    c = tmp_path / "c"
    run_train(3, [*COMMON, f"output_root={c}", f"trainer.resume={tmp_path / 'b' / 'r' / 'checkpoints'}/step_00000004"],
              cache, timeout=300)
    final = json.loads((c / "r" / "checkpoints" / "step_00000008" / "MANIFEST.json").read_text())
    assert final["world_size"] == 3 and final["step"] == 8
    assert sorted(losses_by_step(c / "r")) == [5, 6, 7, 8]


def test_hydra_multirun_inside_one_torchrun(tmp_path, cache):
    """Several jobs in one torchrun: each builds and tears down its own process group."""
    run_train(2, ["-m", "head=npcface,arcface", "trainer.max_steps=2", "trainer.progress_bar=false",
                  "data.val_bins=[]", f"output_root={tmp_path}"], cache, timeout=300)
    sweep = tmp_path / "multirun" / "synthetic-tiny"
    for job in ("0_npcface_seed0", "1_arcface_seed0"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["world_size"] == 2
