import os
import subprocess
import sys
import time

import pytest

from pipeline.distributed import env as env_mod
from pipeline.distributed.env import DistEnv, detect, export, rendezvous, slurm_node_addr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun_variables_give_rank_world_and_master():
    e = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"})
    assert e == DistEnv(rank=3, local_rank=1, world_size=4, master_addr="10.0.0.2", master_port=1234, launcher="torchrun",
                        local_world_size=1, node_rank=3, num_nodes=4)  # ranks per node unknown: each its own node


def test_node_rank_and_count_come_from_the_launcher():
    e = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert (e.node_rank, e.num_nodes, e.local_world_size) == (1, 2, 4)
    e = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_NODEID": "1", "SLURM_NNODES": "2", "MASTER_ADDR": "n1"})
    assert (e.node_rank, e.num_nodes) == (1, 2)


def test_the_deepspeed_launchers_local_rank_argument_is_accepted_and_must_agree():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert detect(env, local_rank_arg=1).local_rank == 1
    with pytest.raises(ValueError, match="--local_rank=0 disagrees with LOCAL_RANK=1"):
        detect({**env, "LOCAL_RANK": "1"}, local_rank_arg=0)


def test_slurm_variables_are_read_when_no_torchrun_variable_is_set():
    e = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345",
                "MASTER_ADDR": "node01"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 8, 1, "node01", "slurm")
    assert e.master_port == 20000 + 12345 % 10000  # one port per job, in 20000-29999: below the ephemeral range
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "99999",
                   "MASTER_ADDR": "h"}).master_port == 29999


def test_slurm_master_is_the_address_slurm_knows_for_the_first_node_of_the_list(slurm_cluster_2nodes, monkeypatch):
    """The node list is expanded by the real `scontrol show hostnames`; the first node's NodeAddr is the master
    (n1 and n2 do not resolve); a node SLURM does not know keeps its name."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster_2nodes.conf)
    e = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert e.master_addr == "127.0.0.1"
    assert slurm_node_addr("gpu07") == "gpu07"
    e = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert e.master_addr == "gpu07"


def test_no_launcher_is_one_process_and_bad_values_are_named():
    e = detect({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "none")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be an integer"):
        detect({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        detect({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_export_writes_what_deepspeed_reads():
    env = {"LOCAL_SIZE": "2"}
    export(detect({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "MASTER_ADDR": "h",
                   "MASTER_PORT": "999", "SLURM_NTASKS_PER_NODE": "2"}), env)
    assert env == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h",
                   "MASTER_PORT": "999"}


def test_a_plain_process_meets_itself_at_the_rendezvous():
    store = rendezvous(detect({}), timeout=30)
    store.set("k", "v")
    assert store.get("k") == b"v"


_RANK = """
import sys
from pipeline.distributed.env import detect, rendezvous
rendezvous(detect(), float(sys.argv[1]))
print("met")
"""


def _ranks(addr: str, port: int, timeout: float, world: int = 2) -> list[subprocess.Popen]:
    procs = []
    for r in range(world):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))},
               "PYTHONPATH": REPO, "SLURM_PROCID": str(r), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(r),
               "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(timeout)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def test_two_ranks_meet_and_a_master_address_where_nothing_listens_fails_every_rank_in_one_line():
    port = env_mod._free_port()
    outs = [p.communicate(timeout=120) for p in _ranks("127.0.0.1", port, 60)]
    assert [o[0].strip() for o in outs] == ["met", "met"], outs
    # 192.0.2.1 (TEST-NET-1) is nobody's address: rank 0 cannot serve there, rank 1 finds nobody.
    t0 = time.monotonic()
    procs = _ranks("192.0.2.1", port, 5)
    outs = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - t0 < 60
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode != 0 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: rendezvous at 192.0.2.1:{port} failed (rank {r} of 2"), err
    assert "not an address of its host" in outs[0][1] and "nothing accepted a connection within 5 s" in outs[1][1]


def test_a_master_address_that_does_not_resolve_is_named():
    with pytest.raises(env_mod.RendezvousError, match=r"rendezvous at no-such-host\.invalid:1234 failed .*does not resolve"):
        rendezvous(DistEnv(rank=1, local_rank=0, world_size=2, master_addr="no-such-host.invalid", master_port=1234,
                           launcher="slurm"), timeout=5)


_NODE = """
import os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from pipeline.distributed import env
d = env.detect(local_rank_arg=int(sys.argv[1].split("=")[1]) if len(sys.argv) > 1 else None)
dist.init_process_group("gloo", store=env.rendezvous(d, 60), rank=d.rank, world_size=d.world_size,
                        timeout=timedelta(seconds=60))
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank {d.rank} of {d.world_size} sum {t.item():g}")
dist.barrier()
dist.destroy_process_group()  # left to interpreter exit, gloo's threads can die with the peer gone (exit 1)
"""


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_launcher_started_once_per_node_meets_at_the_first_nodes_address(launcher, tmp_path):
    """Two "nodes" (two launcher processes on this host, node ranks 0 and 1): torchrun's agent serves the
    store itself (rank 0 then only connects); the deepspeed launcher (--no_ssh, a hostfile) leaves it to rank 0."""
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    (tmp_path / "hosts").write_text("n1 slots=1\nn2 slots=1\n")
    port = env_mod._free_port()
    bindir = os.path.dirname(sys.executable)
    common = {"torchrun": [os.path.join(bindir, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1"],
              "deepspeed": [os.path.join(bindir, "deepspeed"), "--hostfile", str(tmp_path / "hosts"), "--no_ssh"]}[launcher]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))},
           "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*common, "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(script)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for n in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for n, out in enumerate(outs):
        assert f"rank {n} of 2 sum 2" in out, out
