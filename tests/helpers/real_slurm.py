"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's
``slurm-wlm`` and ``munge`` packages, started in a temporary directory with its own
``slurm.conf``, munge key and socket, on free ports of 127.0.0.1, and stopped by their pids.

Nothing global is touched: no /etc/slurm, /etc/munge or system service. The daemons run as the
current user, which must be root (slurmd starts every job as its submitting user).
``unavailable()`` says why the cluster cannot run here (for ``pytest.skip``).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from tests.helpers.slurm_harness import free_port, launcher_env

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sacct")
PARTITION = "debug"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> Optional[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def unavailable() -> Optional[str]:
    """Why a real cluster cannot be started here, or None."""
    missing = [n for n in DAEMONS + CLIENTS[:4] if _which(n) is None]
    if missing:
        return (f"Slurm or munge not installed (missing {', '.join(missing)}); on Debian/Ubuntu: "
                "apt-get install --no-install-recommends slurm-wlm munge")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs (run the Slurm tests as root, as .ci/run does)"
    return None


SLURM_CONF = """\
ClusterName=pfctest
SlurmctldHost={node}(127.0.0.1)
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
OverTimeLimit=1
MinJobAge=600
MessageTimeout=30
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """One node (this machine), ``cpus`` CPUs (default: all), no GRES; state, logs and munge
    socket in ``root``, a fresh directory with a short path (a socket path has at most 107 bytes)."""

    def __init__(self, root: Path, cpus: Optional[int] = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: Dict[str, subprocess.Popen] = {}
        # The node is this machine under its own name: the controller must run on a host of that
        # name, and jobs resolve the node list's first host for their rendezvous.
        self.node = os.uname().nodename.split(".")[0]

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(SLURM_CONF.format(
            dir=self.root, node=self.node, cpus=self.cpus,
            partition=PARTITION, ctld_port=free_port(), slurmd_port=free_port()))
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.root}/munge.sock", f"--pid-file={self.root}/munged.pid",
                               f"--seed-file={self.root}/munged.seed", f"--log-file={self.root}/munged.log"])
        self._wait(lambda: (self.root / "munge.sock").exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld to answer")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, f"node {self.node} to become idle")
        return self

    def stop(self) -> None:
        """Cancel every job, then TERM (and, if need be, KILL) the daemons by their pids."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Jobs' processes belong to slurmstepd, which outlives slurmd: end them first.
            self.run(["scancel", "--full", f"--partition={PARTITION}"], check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                queue = self.run(["squeue", "-h", "-t", "all", "-o", "%T"], check=False).stdout.split()
                if not set(queue) & {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}:
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _spawn(self, name: str, argv: List[str]) -> None:
        log = open(self.root / "logs" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}:\n" + self.logs())

    def _ok(self, argv: List[str], text: str) -> bool:
        res = self.run(argv, check=False)
        return res.returncode == 0 and text in res.stdout

    def _node_idle(self) -> bool:
        res = self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False)
        return res.returncode == 0 and res.stdout.strip() == "idle"

    # ------------------------------------------------------------------ using it
    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The test launcher's environment (slurm_harness.launcher_env, without its stand-ins)
        pointed at this cluster, plus ``extra``."""
        env = launcher_env(extra or {})
        standins = env["PATH"].split(os.pathsep, 1)[0]
        env["PATH"] = os.pathsep.join([p for p in env["PATH"].split(os.pathsep) if p != standins] + list(_SBIN))
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, argv: List[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, env=kw.pop("env", None) or self.env(), capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait_job(self, job_id: str, states, timeout: float) -> Dict[str, str]:
        """Poll until the job is in one of ``states``; its fields (or TimeoutError with the logs)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) "
                                   f"after {timeout:g} s:\n" + self.logs())
            time.sleep(0.5)

    def logs(self, lines: int = 25) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted((self.root / "logs").glob("*.out")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)
