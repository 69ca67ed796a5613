"""Rank, local rank, world size and rendezvous address from whichever launcher started us.

This is the only module that reads the launcher's environment variables. Supported launchers:
torchrun and the `deepspeed` launcher (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), SLURM's
`srun` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), and a plain `python pipeline/train.py` (one process,
world size 1). `task_position` gives the planned stages their SLURM array task and rank (`pipeline/tasks.py`).

Rendezvous under srun, unless MASTER_ADDR/MASTER_PORT are set: the address is the first node's `NodeAddr` as
SLURM knows it (`scontrol show node <first host of SLURM_JOB_NODELIST>`; node names often do not resolve
where the ranks run), falling back to the node name; the port is `20000 + job id % 10000`, one per job in
20000-29999, below Linux's ephemeral range (32768-60999). `init_process_group` fails within
`--rendezvous-timeout` seconds with one line naming address and port, on every rank, instead of hanging,
and sets the collective timeout (`--collective-timeout`) after which a rank waiting for a lost peer fails.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import time
from datetime import timedelta
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 20000
"""Under srun without MASTER_PORT: port = SLURM_PORT_BASE + job id % SLURM_PORT_SPAN."""
SLURM_PORT_SPAN = 10000
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0
"""Seconds every rank waits for all ranks to reach the rendezvous (`--rendezvous-timeout`)."""
DEFAULT_COLLECTIVE_TIMEOUT = 1800.0
"""Seconds a collective waits for a peer before the rank fails (`--collective-timeout`; DeepSpeed's default).
It must cover the longest time one rank works alone while the others wait (rank 0 writing the export)."""


class RendezvousError(SystemExit):
    """The rendezvous could not be reached in time: the message (one line) is printed and the process exits 1,
    on every rank, without a traceback."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    rank: int
    """Global rank, 0 .. world_size-1."""
    local_rank: int
    """Rank on this node; picks the device."""
    world_size: int
    """Number of processes in the job."""
    master_addr: str
    """Host of rank 0 (rendezvous)."""
    master_port: int
    """TCP port of the rendezvous on master_addr."""
    launcher: str
    """Where the numbers came from: "torchrun" (also the deepspeed launcher), "slurm" or "none"."""
    local_world_size: int = 1
    """Processes on this node."""
    node_rank: int = 0
    """This node's index, 0 .. num_nodes-1 (the train loader gives each node its own shards)."""
    num_nodes: int = 1
    """Nodes in the job."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must lie in [0, world_size={self.world_size}) "
                             f"(launcher {self.launcher})")
        if self.local_rank < 0:
            raise ValueError(f"local_rank={self.local_rank} must be >= 0 (launcher {self.launcher})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as `node[01-04],gpu7`, via `scontrol show hostnames`."""
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"`scontrol show hostnames {nodelist}` failed ({done.stderr.strip()[-200:]}): set MASTER_ADDR "
                         f"to the first node's host name in the batch script")
    out = done.stdout.split()
    if not out:
        raise ValueError(f"`scontrol show hostnames {nodelist}` printed no host (SLURM_JOB_NODELIST)")
    return out[0]


def slurm_node_addr(node: str) -> str:
    """The address SLURM reaches `node` at (`NodeAddr` of `scontrol show node`), or the name itself when
    SLURM does not say (then it must resolve on every node)."""
    done = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True)
    for field in done.stdout.split() if done.returncode == 0 else ():
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=") or node
    logger.warning("`scontrol show node %s` gave no NodeAddr (%s): using the node name as MASTER_ADDR", node,
                   done.stderr.strip()[-200:] or "no such field")
    return node


def detect(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Read the launcher's variables. `local_rank_arg` is the `--local_rank=N` the deepspeed launcher
    appends to our argv; it wins over LOCAL_RANK when both are present and they must agree."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else local_rank_arg
        if local_rank is None:
            raise ValueError("RANK and WORLD_SIZE are set but neither LOCAL_RANK nor --local_rank is: "
                             "start the job with torchrun, the deepspeed launcher or srun")
        if local_rank_arg is not None and local_rank_arg != local_rank:
            raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local_rank}")
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        # torchrun sets LOCAL_WORLD_SIZE and GROUP_RANK, the deepspeed launcher LOCAL_SIZE
        per_node = next((_int_var(env, k) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in env), 1)
        return DistEnv(rank=rank, local_rank=local_rank, world_size=world,
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT,
                       launcher="torchrun", local_world_size=per_node,
                       node_rank=_int_var(env, "GROUP_RANK") if "GROUP_RANK" in env else rank // per_node,
                       num_nodes=max(world // per_node, 1))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int_var(env, "SLURM_NTASKS")
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif world == 1:
            addr = "127.0.0.1"
        else:
            addr = slurm_node_addr(first_slurm_host(env["SLURM_JOB_NODELIST"]))
        # One port per job, so two jobs sharing a node do not collide at the rendezvous.
        default_port = SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN
        rank, per_node = _int_var(env, "SLURM_PROCID"), _tasks_per_node(env)
        return DistEnv(rank=rank, local_rank=_int_var(env, "SLURM_LOCALID"),
                       world_size=world, master_addr=addr,
                       master_port=_int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port,
                       launcher="slurm", local_world_size=per_node,
                       node_rank=_int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else rank // per_node,
                       num_nodes=_int_var(env, "SLURM_NNODES") if "SLURM_NNODES" in env else max(world // per_node, 1))
    return DistEnv(rank=0, local_rank=local_rank_arg or 0, world_size=1, master_addr="127.0.0.1",
                   master_port=_free_port(), launcher="none")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class JobIdentity:
    job_id: str | None
    """SLURM_JOB_ID; None outside SLURM."""
    restart_count: int
    """SLURM_RESTART_COUNT: 0 on a job's first run, one more after each requeue (unset means 0)."""


def job_identity(environ: Mapping[str, str] | None = None) -> JobIdentity:
    """Which SLURM job this is and how often it was requeued (the train lease tells a requeue of its own job
    from another trainer by these)."""
    env = os.environ if environ is None else environ
    restart = _int_var(env, "SLURM_RESTART_COUNT") if env.get("SLURM_RESTART_COUNT") else 0
    return JobIdentity(job_id=env.get("SLURM_JOB_ID") or None, restart_count=restart)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TaskPosition:
    """Where a process of a planned stage (shard, pre_encode, render) sits: its SLURM array task and its
    launcher rank within that task (`pipeline/tasks.py` turns these into task k of N)."""
    array_index: int
    """(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP; 0 outside an array."""
    array_count: int
    """SLURM_ARRAY_TASK_COUNT; 1 outside an array."""
    rank: int
    """Launcher rank within the array task, 0 .. ranks-1."""
    ranks: int
    """Ranks per array task; 1 without a launcher."""


def task_position(environ: Mapping[str, str] | None = None) -> TaskPosition:
    """The array task and launcher rank. The rank comes from RANK/WORLD_SIZE (torchrun, deepspeed, our slurm
    scripts, which export them), else from an srun step (SLURM_PROCID/SLURM_STEP_NUM_TASKS). The batch script
    itself is not an srun step: there SLURM_NTASKS counts tasks that do not run, so it is ignored."""
    env = os.environ if environ is None else environ
    array_index, array_count = _array_task(env)
    rank, ranks = _task_rank(env)
    return TaskPosition(array_index=array_index, array_count=array_count, rank=rank, ranks=ranks)


def _task_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"{name} is not set") from None
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _array_task(env: Mapping[str, str]) -> tuple[int, int]:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    task_id, first = _task_int(env, "SLURM_ARRAY_TASK_ID"), _task_int(env, "SLURM_ARRAY_TASK_MIN")
    count = _task_int(env, "SLURM_ARRAY_TASK_COUNT")
    step = _task_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    index, rest = divmod(task_id - first, step)
    if rest or not 0 <= index < count:
        raise ValueError(
            f"SLURM_ARRAY_TASK_ID={task_id} is not task {index} of a range MIN={first} STEP={step} "
            f"COUNT={count}: submit the array as one range (--array=0-{count - 1}), not a list")
    return index, count


def _task_rank(env: Mapping[str, str]) -> tuple[int, int]:
    if "RANK" in env or "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_STEP_NUM_TASKS" in env:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    else:
        return 0, 1
    rank, ranks = _task_int(env, names[0]), _task_int(env, names[1])
    if not 0 <= rank < ranks:
        raise ValueError(f"{names[0]}={rank} must be in [0, {names[1]}={ranks})")
    return rank, ranks


def _tasks_per_node(env: Mapping[str, str]) -> int:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_TASKS_PER_NODE (`2(x3),1`); 1 when neither is set."""
    value = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    return int(value.split("(")[0].split(",")[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(denv: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write the variables DeepSpeed's `init_distributed()` reads (it knows no SLURM variable and,
    without them, falls back to mpi4py)."""
    env = os.environ if environ is None else environ
    env["RANK"] = str(denv.rank)
    env["LOCAL_RANK"] = str(denv.local_rank)
    env["WORLD_SIZE"] = str(denv.world_size)
    # No LOCAL_SIZE (the deepspeed launcher sets it): with LOCAL_SIZE equal to the world size, DeepSpeed's
    # CPU backend maps a 69 MB /dev/shm buffer per rank for its inference all-reduce (which training never
    # calls) and never unlinks it; a small /dev/shm (64 MB in a default container) crashes the rank.
    env.pop("LOCAL_SIZE", None)
    env["MASTER_ADDR"] = denv.master_addr
    env["MASTER_PORT"] = str(denv.master_port)


def device_for(denv: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", denv.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(denv: DistEnv, *, rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT,
                       collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
    """Start torch.distributed (nccl on GPU, gloo on CPU) on a store we open ourselves, then DeepSpeed on
    top of it. World size 1 gets a real one-rank group too, so collectives need no `if` (k-diffusion's
    `ensure_distributed`). Raises RendezvousError within `rendezvous_timeout` seconds when the ranks cannot
    meet; collectives then fail after `collective_timeout` seconds without their peers."""
    import deepspeed  # here, not at import time: tests of the data and checkpoint code skip its start-up

    export(denv)
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(denv))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        store = rendezvous(denv, rendezvous_timeout)
        dist.init_process_group(backend, store=store, rank=denv.rank, world_size=denv.world_size,
                                timeout=timedelta(seconds=collective_timeout))
        # DeepSpeed adopts the group (its TorchBackend sees it initialised) and keeps the same timeout.
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=collective_timeout))
    logger.info("distributed: rank %d/%d local_rank %d of %d via %s, master %s:%d", denv.rank, denv.world_size,
                denv.local_rank, denv.local_world_size, denv.launcher, denv.master_addr, denv.master_port)


def _hosts_store(denv: DistEnv) -> bool:
    """Rank 0 serves the rendezvous store, except under torchrun, whose agent already serves it."""
    return denv.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def rendezvous(denv: DistEnv, timeout: float) -> dist.TCPStore:
    """The TCP store every rank meets at, at MASTER_ADDR:MASTER_PORT, within `timeout` seconds.

    Checked in Python first, so a wrong address ends in one line instead of c10d's retry log: the address must
    resolve; the rank that serves the store must own it (binding to it fails at once otherwise); the others
    retry connecting until the deadline."""
    where = f"{denv.master_addr}:{denv.master_port}"
    deadline = time.monotonic() + timeout

    def fail(why: str) -> RendezvousError:
        return RendezvousError(f"error: rendezvous at {where} failed (rank {denv.rank} of {denv.world_size}, "
                               f"via {denv.launcher}): {why}; set MASTER_ADDR/MASTER_PORT to the address and a free "
                               f"port of the first node, or raise --rendezvous-timeout")

    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(denv.master_addr, denv.master_port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise fail(f"the address does not resolve ({e.strerror})") from None
    if _hosts_store(denv):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
            except OSError as e:
                raise fail(f"rank 0 serves the rendezvous but {sockaddr[0]} is not an address of its host "
                           f"{socket.gethostname()} ({e.strerror})") from None
    else:
        while True:
            try:
                socket.create_connection(sockaddr[:2], timeout=max(min(5.0, deadline - time.monotonic()), 0.1)).close()
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise fail(f"nothing accepted a connection within {timeout:g} s ({e.strerror or e})") from None
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
    left = max(deadline - time.monotonic(), 1.0)
    try:
        store = dist.TCPStore(denv.master_addr, denv.master_port, world_size=denv.world_size,
                              is_master=_hosts_store(denv), timeout=timedelta(seconds=left), wait_for_workers=True)
    except RuntimeError as e:  # DistNetworkError, DistStoreError: a port in use, ranks missing at the deadline
        raise fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    store.set_timeout(timedelta(seconds=timeout))  # later waits on the store (the backend's own connect) get it all
    return store


def init_logging(rank: int, level: int = logging.INFO) -> None:
    """One format for every stage run under a launcher: the rank in the prefix, INFO from rank 0 only
    (warnings from every rank), unless CANTUS_LOG_ALL_RANKS=1."""
    all_ranks = os.environ.get("CANTUS_LOG_ALL_RANKS") == "1"
    logging.basicConfig(level=level if rank == 0 or all_ranks else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
