"""Train with Hydra configs from conf/: ``torchrun --nproc_per_node=N launch/train.py data=... ``.

Runs under torchrun (env://), under Slurm without torchrun (SLURM_* variables), or as one process.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from partial_fc.train import run_training  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    job_num = OmegaConf.select(hydra_cfg, "job.num", default=0)  # set in multirun only
    run_training(cfg, Path(hydra_cfg.runtime.output_dir), job_num=int(job_num or 0))


if __name__ == "__main__":
    main()
