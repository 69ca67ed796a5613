"""Start and stop a real SLURM (munged, slurmctld, one slurmd per node) on 127.0.0.1 for tests.

Everything is private to one ``start()``: its own munged socket, its own ports, its own
``slurm.conf``, state and spool directories, so it neither needs nor disturbs a SLURM or munge that
may already run on the machine, and every job its controller knows was submitted by its user.
Commands reach it through ``SLURM_CONF`` (``Cluster.env()``). From pytest, use the session fixture
``slurm_cluster`` (one node named after the host) or ``slurm_cluster_2nodes`` (nodes ``n1`` and ``n2``, each
its own slurmd with its own port, both at NodeAddr 127.0.0.1; the names do not resolve, as on many clusters);
import them in tests/conftest.py. From a shell::

    python tests/slurmcluster.py start --dir D [--nodes 2]  # prints `export SLURM_CONF=...`, writes D/cluster.json
    python tests/slurmcluster.py stop --dir D    # scancel every job, stop only the daemons in D/cluster.json

The Debian packages come from ``tools/install_system.sh --test``. The configuration follows the recipe
verified in ENVIRONMENT.md ("A real single-node SLURM", "Two SLURM nodes on one host"); the comments say
why each line is there. Several nodes share this machine's /tmp and CPUs: a test that stands for node-local
disks gives each node its own folder, by ``SLURMD_NODENAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MUNGE_KEY = "/etc/munge/munge.key"


@dataclasses.dataclass(frozen=True)
class Cluster:
    conf: str
    """Path of the generated slurm.conf; commands find the cluster through ``SLURM_CONF``."""
    base_dir: str
    """Holds slurm.conf, state, spool, logs and pid files."""
    munge_dir: str
    """munged's socket, pid, seed and log (outside ``base_dir``: the munge user must reach it)."""
    pids: dict[str, int]
    """The daemons this cluster started: ``munged``, ``slurmctld``, ``slurmd.<node>`` per node."""
    cpus: int
    """CPUs each node advertises (more than the machine has, so several 1-CPU tasks run at once)."""
    nodes: tuple[str, ...] = ()
    """The node names, in the partition's order."""

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with ``SLURM_CONF`` pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": self.conf}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a SLURM client command (``sbatch``, ``squeue``, ...) against this cluster; its stdout."""
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def job_ids(self) -> list[str]:
        """Every job the controller still knows (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%A").split()

    def wait(self, job_ids: list[str], timeout: float = 300) -> None:
        """Return once none of ``job_ids`` is in ``squeue`` (``sbatch --wait`` returns ~4 s late)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.run("squeue", "-h", "-o", "%i", "-j", ",".join(job_ids), check=False).split()
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {left} still queued after {timeout:.0f} s:\n"
                                   + self.run("squeue", "-o", "%i %j %T %r", check=False))
            time.sleep(0.5)

    def jobcomp(self) -> list[dict[str, str]]:
        """The jobcomp file's records of finished runs, oldest first: one per run of a job (a requeued job
        has one per run, the first with JobState PENDING), one per array task (``ArrayJobId`` and
        ``ArrayTaskId`` name it; the array's own id is one of its tasks' ``JobId``)."""
        path = Path(self.base_dir, "jobcomp.txt")
        if not path.exists():
            return []
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in path.read_text().splitlines()]


def _free_port() -> int:
    while True:
        port = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (a killed daemon nobody reaped) counts as gone."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _read_pid(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not written after {timeout:.0f} s: the daemon did not start")
        time.sleep(0.1)


def _clear_stale(pid_file: Path) -> None:
    """A pid file left by a killed daemon would make the next one refuse to start or mislead us."""
    if pid_file.exists():
        text = pid_file.read_text().strip()
        if text.isdigit() and _alive(int(text)):
            raise RuntimeError(f"{pid_file}: process {text} still runs; stop it first")
        pid_file.unlink()


def _host() -> str:
    return socket.gethostname().split(".")[0]


def node_names(nodes: int) -> tuple[str, ...]:
    """One node: named after the host, as a plain install has it. Several: n1, n2, ... (names that do not
    resolve, so a rendezvous must take the address SLURM knows, NodeAddr)."""
    return (_host(),) if nodes == 1 else tuple(f"n{i}" for i in range(1, nodes + 1))


def _node_lines(cpus: int, names: tuple[str, ...]) -> list[str]:
    """The slurm.conf node lines, from ``slurmd -C`` with ``cpus`` CPUs per node. Several nodes on this host
    each get their own slurmd port (``Port=``) and ``NodeHostname`` (where their slurmd runs)."""
    fields = dict(f.split("=", 1) for f in subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.split() if "=" in f)
    # One socket of `cpus` single-thread cores: with CR_Core each 1-CPU task takes one core.
    shape = (f"CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
             f"RealMemory={fields['RealMemory']} State=UNKNOWN")
    if len(names) == 1:
        return [f"NodeName={names[0]} NodeAddr=127.0.0.1 {shape}"]
    return [f"NodeName={n} NodeHostname={_host()} NodeAddr=127.0.0.1 Port={_free_port()} {shape}" for n in names]


def write_conf(base: Path, munge_socket: str, cpus: int, names: tuple[str, ...] | None = None) -> Path:
    names = names or node_names(1)
    node = _host()
    several = len(names) > 1
    for sub in ("state", "spool", *(f"spool/{n}" for n in names if several)):
        (base / sub).mkdir(parents=True, exist_ok=True)
    # `%n` (the node name): each slurmd of this host needs its own spool, pid and log file.
    per_node = ".%n" if several else ""
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=cantus",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",  # our private munged, not the system one
        "ProctrackType=proctrack/pgid",  # with linuxproc a background child outlives its job
        "TaskPlugin=task/none",  # no cgroups here
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",  # final job states, read by Cluster.states()
        f"JobCompLoc={base / 'jobcomp.txt'}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerParameters=batch_sched_delay=0",  # a 2-job chain in 1.5 s instead of 6 s
        "EnforcePartLimits=ALL",  # else a job asking for more than exists pends forever
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # advertise `cpus`, more than the machine has
        "MpiDefault=none",
        "KillWait=5",
        "MinJobAge=2",  # finished jobs leave squeue quickly
        f"StateSaveLocation={base / 'state'}",
        f"SlurmdSpoolDir={base / 'spool'}{'/%n' if several else ''}",
        f"SlurmctldPidFile={base / 'slurmctld.pid'}",
        f"SlurmdPidFile={base / f'slurmd{per_node}.pid'}",
        f"SlurmctldLogFile={base / 'slurmctld.log'}",
        f"SlurmdLogFile={base / f'slurmd{per_node}.log'}",
        "SlurmdDebug=info",  # higher levels print slurmstepd debug lines on srun's stderr
        *_node_lines(cpus, names),
        f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


def _start_munged(munge_dir: Path) -> int:
    pw = pwd.getpwnam("munge")
    os.chown(munge_dir, pw.pw_uid, pw.pw_gid)
    pid_file = munge_dir / "munged.pid"
    _clear_stale(pid_file)
    subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge_dir / 'socket'}",
                    f"--pid-file={pid_file}", f"--log-file={munge_dir / 'munged.log'}",
                    f"--seed-file={munge_dir / 'seed'}", f"--key-file={MUNGE_KEY}"],
                   check=True, capture_output=True, timeout=30)
    pid = _read_pid(pid_file)
    cred = subprocess.run(["munge", "-n", "-S", str(munge_dir / "socket")], capture_output=True, check=True)
    subprocess.run(["unmunge", "-S", str(munge_dir / "socket")], input=cred.stdout, capture_output=True,
                   check=True)
    return pid


def start(base_dir: str, cpus: int = 8, timeout: float = 60, nodes: int = 1) -> Cluster:
    """Start munged, slurmctld and one slurmd per node; return once every node is idle."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: run tools/install_system.sh --test (as root)")
    if os.geteuid() != 0:
        raise RuntimeError("the test SLURM runs its daemons as root (SlurmUser=root): run as root")
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    # munged runs as `munge` and checks every directory on its socket's path: a pytest temp dir (0700
    # root) is out of its reach, so its files live in a directory of their own under /tmp.
    munge_dir = Path(tempfile.mkdtemp(prefix="cantus-munge-"))
    munge_dir.chmod(0o755)
    pids: dict[str, int] = {}
    names = node_names(nodes)
    cluster = Cluster(str(base / "slurm.conf"), str(base), str(munge_dir), pids, cpus, names)
    try:
        pids["munged"] = _start_munged(munge_dir)
        write_conf(base, str(munge_dir / "socket"), cpus, names)
        env = cluster.env()
        daemons = [("slurmctld", ["slurmctld", "-i"], base / "slurmctld.pid")]
        daemons += [(f"slurmd.{n}", ["slurmd", "-N", n], base / ("slurmd.pid" if nodes == 1 else f"slurmd.{n}.pid"))
                    for n in names]
        for daemon, args, pid_file in daemons:
            _clear_stale(pid_file)
            subprocess.run(args, env=env, check=True, capture_output=True, timeout=30)  # forks
            pids[daemon] = _read_pid(pid_file)
        deadline = time.monotonic() + timeout
        while True:
            state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).split()
            if state == ["idle"] * nodes:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"node states {state!r} after {timeout:.0f} s; see {base}/slurmctld.log "
                                   f"and {base}/slurmd*.log")
            time.sleep(0.2)
        Path(base, "cluster.json").write_text(json.dumps(dataclasses.asdict(cluster)))
        return cluster
    except BaseException:
        stop(cluster)
        raise


def _stop_pid(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.1)


def stop(cluster: Cluster) -> None:
    """Cancel every job (jobs outlive ``scontrol shutdown``), then stop only the daemons we started."""
    if "slurmctld" in cluster.pids and _alive(cluster.pids["slurmctld"]):
        jobs = cluster.job_ids()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            try:
                cluster.wait(jobs, timeout=60)
            except TimeoutError:
                pass  # shutdown below still stops the daemons; slurmd kills what is left
        cluster.run("scontrol", "shutdown", check=False)
    slurmds = [d for d in cluster.pids if d.startswith("slurmd")]
    for daemon in (*slurmds, "slurmctld", "munged"):
        pid = cluster.pids.get(daemon)
        if pid is None or not _alive(pid):
            continue
        if daemon == "munged" or not _wait_gone(pid, 10):
            os.kill(pid, signal.SIGTERM)
        _stop_pid(pid)
    shutil.rmtree(cluster.munge_dir, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


try:  # the session fixture; tests/conftest.py imports it (`from slurmcluster import slurm_cluster`)
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory):
        """A running single-node SLURM for the session (tools/test.sh installs the packages)."""
        if shutil.which("slurmctld") is None or shutil.which("munged") is None:
            pytest.fail("SLURM is not installed: run tools/install_system.sh --test (as root), as tools/test.sh does")
        cluster = start(str(tmp_path_factory.mktemp("slurm")))
        try:
            yield cluster
        finally:
            stop(cluster)

    @pytest.fixture(scope="session")
    def slurm_cluster_2nodes(tmp_path_factory):
        """A running two-node SLURM (n1, n2: two slurmd on this host, NodeAddr 127.0.0.1) for the session."""
        if shutil.which("slurmctld") is None or shutil.which("munged") is None:
            pytest.fail("SLURM is not installed: run tools/install_system.sh --test (as root), as tools/test.sh does")
        cluster = start(str(tmp_path_factory.mktemp("slurm2")), cpus=4, nodes=2)
        try:
            yield cluster
        finally:
            stop(cluster)
except ImportError:  # used as a script without pytest
    pass


def _load(state: Path) -> Cluster:
    fields = json.loads(state.read_text())
    return Cluster(**{**fields, "nodes": tuple(fields.get("nodes", ()))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, help="cluster directory; holds slurm.conf and cluster.json")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs each node advertises")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (several: n1, n2, ... on this host)")
    args = parser.parse_args(argv)
    state = Path(args.dir, "cluster.json")
    if args.action == "start":
        if state.exists():
            old = _load(state)
            if any(_alive(p) for p in old.pids.values()):
                raise SystemExit(f"{state}: a cluster is already running there; stop it first")
        cluster = start(args.dir, args.cpus, nodes=args.nodes)
        sys.stdout.write(f"export SLURM_CONF={cluster.conf}\n")
    else:
        if not state.exists():
            raise SystemExit(f"{state}: no cluster state, nothing to stop")
        stop(_load(state))
        state.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
