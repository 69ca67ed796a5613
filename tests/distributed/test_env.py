import pytest

from pipeline.distributed.env import DistEnv, detect, export


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
    assert e.master_port == 20000 + 12345 % 20000  # one port per job


def test_slurm_master_is_the_first_host_of_the_node_list(slurm_cluster, monkeypatch):
    """The node list is expanded by the real `scontrol show hostnames` (it needs a slurm.conf)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
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
