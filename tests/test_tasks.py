"""pipeline.tasks: k = array_index * W + rank, N = array_count * W, from a plain env mapping."""

import pytest

from pipeline.tasks import TaskSlot, task_count, task_slot


def array(task_id, count, first=0, **more):
    return {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_COUNT": str(count), **{k: str(v) for k, v in more.items()}}


def test_no_array_and_no_launcher_is_task_0_of_1():
    assert task_slot({}) == TaskSlot(0, 1)


def test_array_index_counts_from_the_array_minimum():
    assert task_slot(array(7, 4, first=5)) == TaskSlot(2, 4)


def test_array_tasks_times_launcher_ranks_cover_every_task_exactly_once():
    slots = [task_slot(array(a, 3, first=10, RANK=r, WORLD_SIZE=2)) for a in (10, 11, 12) for r in (0, 1)]
    assert [s.index for s in slots] == [0, 1, 2, 3, 4, 5]  # k = array_index * W + rank
    assert {s.count for s in slots} == {6}  # N = array_count * W


def test_srun_step_ranks_count_but_the_batch_script_tasks_do_not():
    assert task_slot({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}) == TaskSlot(1, 2)
    # The batch script of an --ntasks=2 job runs once: it must not claim to be one task of two.
    assert task_slot({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == TaskSlot(0, 1)


def test_array_with_a_step_maps_to_consecutive_indices():
    assert task_slot(array(4, 3, SLURM_ARRAY_TASK_STEP=2)) == TaskSlot(2, 3)


def test_array_given_as_a_list_is_refused():
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=7 is not task 6 of a range MIN=1 STEP=1 COUNT=3"):
        task_slot(array(7, 3, first=1))


def test_explicit_flags_win_over_the_environment():
    assert task_slot(array(1, 2), task_index=3, num_tasks=5) == TaskSlot(3, 5)


@pytest.mark.parametrize("kwargs, env, message", [
    ({"task_index": 1}, {}, "give both or neither"),
    ({"task_index": 5, "num_tasks": 5}, {}, r"task index 5 must be in \[0, 5\)"),
    ({}, {"RANK": "0"}, "WORLD_SIZE is not set"),
    ({}, {"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({}, {"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 must be in \[0, WORLD_SIZE=2\)"),
    ({}, {"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_MIN is not set"),
])
def test_bad_task_settings_name_the_variable(kwargs, env, message):
    with pytest.raises(ValueError, match=message):
        task_slot(env, **kwargs)


def test_a_commit_job_takes_the_task_count_from_the_flag_else_from_the_environment():
    assert task_count(array(0, 4), num_tasks=3) == 3
    assert task_count({}, num_tasks=None) == 1
    assert task_count(array(2, 4, RANK=0, WORLD_SIZE=2)) == 8
    with pytest.raises(ValueError, match="--num-tasks=0: expected at least 1"):
        task_count({}, num_tasks=0)
