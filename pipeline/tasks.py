"""Which task of a planned stage this process is: ``k`` of ``N``.

ARCHITECTURE.md "Manifests": ``k = array_index * W + rank`` and ``N = array_count * W``, where
``array_index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``,
``array_count = SLURM_ARRAY_TASK_COUNT`` and ``W`` is the number of ranks per array task (1 without a
launcher). Task ``k`` then owns plan items ``i`` with ``i % N == k``.

The launcher rank comes from ``RANK``/``WORLD_SIZE`` (torchrun, deepspeed, and our slurm scripts,
which export them), else from an ``srun`` step (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``). The batch
script itself is not an srun step: there ``SLURM_NTASKS`` counts tasks that do not run, so it is
ignored, else the other tasks' items would never be processed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSlot:
    index: int
    """k: this task's index, 0 <= k < count."""
    count: int
    """N: the number of tasks the plan is split into."""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"task index {self.index} must be in [0, {self.count}) (num_tasks={self.count})")


def task_slot(env: Mapping[str, str] | None = None, task_index: int | None = None,
              num_tasks: int | None = None) -> TaskSlot:
    """This process's task. Explicit ``task_index``/``num_tasks`` (the ``--task-index``/``--num-tasks``
    flags; give both or neither) win over ``env`` (default ``os.environ``)."""
    if (task_index is None) != (num_tasks is None):
        raise ValueError(f"--task-index={task_index} and --num-tasks={num_tasks}: give both or neither")
    if task_index is not None and num_tasks is not None:
        return TaskSlot(task_index, num_tasks)
    env = os.environ if env is None else env
    array_index, array_count = _array(env)
    rank, ranks = _rank(env)
    return TaskSlot(array_index * ranks + rank, array_count * ranks)


def task_count(env: Mapping[str, str] | None = None, num_tasks: int | None = None) -> int:
    """N for a step that is not one of the tasks (a commit job merging their parts): ``num_tasks`` (the
    ``--num-tasks`` flag) if given, else the count `task_slot` finds in ``env``."""
    if num_tasks is not None:
        if num_tasks < 1:
            raise ValueError(f"--num-tasks={num_tasks}: expected at least 1")
        return num_tasks
    return task_slot(env).count


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"{name} is not set") from None
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _array(env: Mapping[str, str]) -> tuple[int, int]:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    task_id, first = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_MIN")
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    index, rest = divmod(task_id - first, step)
    if rest or not 0 <= index < count:
        raise ValueError(
            f"SLURM_ARRAY_TASK_ID={task_id} is not task {index} of a range MIN={first} STEP={step} "
            f"COUNT={count}: submit the array as one range (--array=0-{count - 1}), not a list")
    return index, count


def _rank(env: Mapping[str, str]) -> tuple[int, int]:
    if "RANK" in env or "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_STEP_NUM_TASKS" in env:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    else:
        return 0, 1
    rank, ranks = _int(env, names[0]), _int(env, names[1])
    if not 0 <= rank < ranks:
        raise ValueError(f"{names[0]}={rank} must be in [0, {names[1]}={ranks})")
    return rank, ranks
