"""A real Slurm cluster on this machine, for the tests: a private munged, slurmctld and one slurmd per emulated node.

Adapted from the project's shared local-slurm scripts. No systemd, cgroups or accounting; every daemon runs in the
foreground as a child of the test process, with its key, sockets, config, state and logs in one directory, so
`stop()` ends exactly what `start()` began. Node names (node1, node2, ...) must resolve, because the sbatch templates
use the first one as the main process's address: missing ones are added to /etc/hosts and removed again at stop.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from dist_tsp.side_by_side import free_port

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# dist-tsp test cluster"


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd and munged)"
    if missing := [c for c in COMMANDS if shutil.which(c, path=PATH) is None]:
        return (f"Slurm is not installed (no {', '.join(missing)}): "
                "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    return None


class LocalSlurm:
    """`nodes` emulated nodes (node1..nodeN, every one this machine) in partition `debug`."""

    def __init__(self, nodes: int = 2):
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.root = Path(tempfile.mkdtemp(prefix="dist-tsp-slurm-"))
        self.root.chmod(0o755)  # munged wants every directory above its socket searchable by all
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "PATH": PATH, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.added_hosts: list[str] = []

    def start(self) -> None:
        try:
            self._start_munged()
            self._write_conf()
            self._resolve_node_names()
            self._daemon(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
            for node in self.nodes:
                self._daemon(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, stop the daemons (TERM, then KILL after 20 s), undo /etc/hosts, delete the directory."""
        if "slurmctld" in self.daemons and (jobs := self.job_ids()):
            self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 30
            while self.job_ids() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons.values()):
            daemon.terminate()
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if self.added_hosts:
            HOSTS.write_text("".join(line for line in HOSTS.read_text().splitlines(keepends=True)
                                     if not line.rstrip().endswith(HOSTS_MARK)))  # in place: may be a bind mount
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
        return done

    def job_ids(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = self.run("scontrol", "-o", "show", "job", job_id).stdout.split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def job_log_lines(self, job_id: str) -> str:
        """What the daemons logged about one job (for failure messages)."""
        pattern = re.compile(rf"JobId={job_id}\b|\bjob ?{job_id}\b|StepId={job_id}\.|\[{job_id}\.", re.IGNORECASE)
        return "\n".join(f"{log.stem}: {line}" for log in sorted(self.root.glob("slurm*.log"))
                         for line in log.read_text(errors="replace").splitlines() if pattern.search(line))

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                         for log in sorted(self.root.glob("*.log")))

    def _start_munged(self) -> None:
        key_dir, socket_dir = self.root / "munge-key", self.root / "munge"
        key_dir.mkdir(mode=0o700)
        socket_dir.mkdir(mode=0o755)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = socket_dir / "munge.socket"
        self._daemon(["munged", "--foreground", f"--socket={self.socket}", f"--key-file={key}",
                      f"--pid-file={key_dir / 'munged.pid'}", f"--seed-file={key_dir / 'munged.seed'}",
                      f"--log-file={self.root / 'munged.log'}"], "munged")
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.daemons["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start:\n{self.log_tails()}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        """slurm.conf: this machine's hardware (as `slurmd -C` sees it) once per node; jobs may be requeued."""
        hardware = dict(f.split("=", 1) for f in self._slurmd_c().split() if "=" in f)
        host = socket.gethostname().split(".")[0]
        ports = [free_port() for _ in range(len(self.nodes) + 1)]
        memory = int(hardware["RealMemory"]) * 9 // 10 // len(self.nodes)
        cpus = " ".join(f"{k}={hardware[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                       "ThreadsPerCore"))
        state = self.root / "state"
        lines = [
            "ClusterName=disttsptest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ports[0]}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}", f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "MpiDefault=none", "MailProg=/bin/true",
            "EnforcePartLimits=ALL",  # an impossible request fails at submission instead of pending forever
            "ReturnToService=2", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none", "InactiveLimit=0",
            "KillWait=30",  # Slurm's default: what a job has between SIGTERM (scancel, preemption) and SIGKILL
            # sbatch --wait polls every 2 s only while MinJobAge <= 5, but may then miss the exit code of an
            # array task that ended long before the last one (the project's shared notes keep 300 for that).
            "MinJobAge=5",
            "JobRequeue=1", "SlurmdTimeout=60", "Waittime=0",
            *(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {cpus} RealMemory={memory}"
              for node, port in zip(self.nodes, ports[1:])),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        (state / "ctld").mkdir(parents=True)
        for node in self.nodes:
            (state / node).mkdir()
        self.conf.write_text("\n".join(lines) + "\n")

    def _slurmd_c(self) -> str:
        done = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True, check=True)
        return done.stdout.splitlines()[0]

    def _resolve_node_names(self) -> None:
        for node in self.nodes:
            try:
                socket.gethostbyname(node)
            except OSError:
                with HOSTS.open("a") as hosts:
                    hosts.write(f"127.0.0.1 {node} {HOSTS_MARK}\n")
                self.added_hosts.append(node)

    def _daemon(self, command: list[str], name: str) -> None:
        with open(self.root / f"{name}.stdout", "w") as out:
            self.daemons[name] = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            if states.count("idle") == len(self.nodes):
                return
            dead = [name for name, daemon in self.daemons.items() if daemon.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"cluster not up ({' '.join(states) or 'no answer'}; exited: {dead}):\n"
                                   f"{self.log_tails()}")
            time.sleep(0.3)
