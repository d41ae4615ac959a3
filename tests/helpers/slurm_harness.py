"""Running the Slurm launch scripts on one machine: stand-in Slurm commands, a clean environment,
hard timeouts, and clean-up of every process a run started."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "launch" / "slurm"
_STANDINS_SOURCE = Path(__file__).resolve().parent / "slurm_standins"


def _executable_standins() -> Path:
    """The stand-in Slurm commands, executable (a copy if the checkout lost the exec bits)."""
    if all(os.access(f, os.X_OK) for f in _STANDINS_SOURCE.iterdir()):
        return _STANDINS_SOURCE
    copy = Path(tempfile.mkdtemp(prefix="pfc-standins-"))
    for f in _STANDINS_SOURCE.iterdir():
        shutil.copy(f, copy / f.name)
        (copy / f.name).chmod(0o755)
    return copy


STANDINS = _executable_standins()

# Variables that would make the launched processes believe they are already part of a job.
_JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(extra: Dict[str, str]) -> Dict[str, str]:
    """This environment without Slurm or torchrun job variables, with the stand-in Slurm commands
    and the interpreter running the tests (and its torchrun) first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "PFC_")) and k not in _JOB_VARS}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(STANDINS), str(bin_dir), env.get("PATH", "")])
    if shutil.which("torchrun", path=env["PATH"]) is None:
        env["PFC_TORCHRUN"] = f"{sys.executable} -m torch.distributed.run"
    env.update(extra)
    return env


def _marked_pids(marker: str) -> List[int]:
    """Processes of this user whose environment holds PFC_TEST_MARKER=<marker> (Linux /proc)."""
    needle = f"PFC_TEST_MARKER={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_marked(marker: str) -> None:
    """TERM, then KILL, every process still carrying ``marker`` (torchrun workers run in their own
    sessions, so killing the launcher's process group alone could leave them behind)."""
    if not Path("/proc/self/environ").exists():
        return
    for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        pids = [p for p in _marked_pids(marker) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(pause)


class ScriptRun:
    """A bash script in its own session, output collected line by line, with a hard timeout."""

    def __init__(self, argv: List[str], env: Dict[str, str], cwd: Path):
        self.marker = uuid.uuid4().hex
        env = dict(env, PFC_TEST_MARKER=self.marker)
        self.proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return True
            if self.proc.poll() is not None:
                return text in self.output
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def finish(self, timeout: float) -> Optional[int]:
        """The exit status, or None after killing everything when ``timeout`` passed."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            kill_marked(self.marker)
            self._reader.join(timeout=5)

    def tail(self, n: int = 60) -> str:
        return "".join(self.lines[-n:])
