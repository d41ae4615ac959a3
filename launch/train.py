"""Train with Hydra configs from conf/: ``torchrun --nproc_per_node=N launch/train.py data=... ``.

Runs under torchrun (env://), under Slurm without torchrun (SLURM_* variables), or as one process.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from partial_fc.data.datasets import BadSampleError, DatasetError  # noqa: E402
from partial_fc.data.image import ImageDecodeError  # noqa: E402
from partial_fc.data.recordio import RecordIOError  # noqa: E402
from partial_fc.tools.common import INPUT_ERROR_STATUS, error_line  # noqa: E402
from partial_fc.train import ConfigError, NetworkInterfaceError, run_training  # noqa: E402
from partial_fc.train.checkpoint import CheckpointError, IncompleteCheckpointError  # noqa: E402
from partial_fc.outputs import OutputError  # noqa: E402

# A bad config, data set, checkpoint or output folder: one line and INPUT_ERROR_STATUS (each
# worker prints its own). Anything else keeps Hydra's handling (HYDRA_FULL_ERROR=1 for the full
# traceback). A data set's refusals derive from DatasetError (LabelError among them), a file the
# run cannot write raises OutputError (CheckpointWriteError among them), and a file named by a
# key that does not fit (model.pretrained, data.val_bins, data.root) a ConfigError naming the key;
# a network interface that cannot carry the process group a NetworkInterfaceError.
INPUT_ERRORS = (ConfigError, CheckpointError, IncompleteCheckpointError, DatasetError, BadSampleError,
                RecordIOError, ImageDecodeError, OutputError, NetworkInterfaceError)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    job_num = OmegaConf.select(hydra_cfg, "job.num", default=0)  # set in multirun only
    try:
        run_training(cfg, Path(hydra_cfg.runtime.output_dir), job_num=int(job_num or 0))
    except INPUT_ERRORS as err:
        print(error_line("train.py", err), file=sys.stderr, flush=True)
        sys.exit(INPUT_ERROR_STATUS)


if __name__ == "__main__":
    main()
