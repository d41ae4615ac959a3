"""conf/hydra/launcher/slurm.yaml: composes with the real config, is accepted by submitit, and
renders the sbatch script a sweep would submit.

The job is not submitted (no Slurm here): submitit's Slurm executor validates the parameters and
writes the sbatch text; `srun` only has to be on PATH for the executor to start (a stand-in).
"""
from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
submitit = pytest.importorskip("submitit")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from tests.helpers.slurm_harness import REPO, STANDINS  # noqa: E402


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_composes_over_the_plugin_config():
    cfg = _compose("hydra/launcher=slurm", "experiment=ms1mv3_r100_npcface", "hydra.launcher.nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # one process per GPU: partial_fc.train.env maps SLURM_LOCALID to the GPU
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.nodes == 2
    assert launcher.max_num_timeout > 0  # requeue at the time limit: training resumes
    assert cfg.trainer.resume == "auto"
    assert OmegaConf.to_container(launcher, resolve=True)["name"] == "pfc-ms1mv3-r100-npcface"


def test_slurm_launcher_renders_a_valid_sbatch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose("hydra/launcher=slurm", "hydra.launcher.nodes=2",
                   "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}")
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    # The plugin's translation (SlurmLauncher.launch): base keys as they are, the rest prefixed.
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder,
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "0")
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", text, re.M))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "8"
    assert sbatch["gpus-per-node"] == "8" and sbatch["cpus-per-task"] == "8"
    assert sbatch["partition"] == "gpu" and sbatch["time"] == "1440"
    assert sbatch["signal"] == "USR2@180"
    assert "requeue" in sbatch and sbatch["open-mode"] == "append"
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert re.search(r"^srun .*python -u -m submitit.core._submit", text, re.M)
