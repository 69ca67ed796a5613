"""Which task of a planned stage this process is: ``k`` of ``N``.

ARCHITECTURE.md "Manifests": ``k = array_index * W + rank`` and ``N = array_count * W``, where
``array_index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``,
``array_count = SLURM_ARRAY_TASK_COUNT`` and ``W`` is the number of ranks per array task (1 without a
launcher). Task ``k`` then owns plan items ``i`` with ``i % N == k``.

The numbers come from `pipeline.distributed.env.task_position`, the one reader of the launcher's variables:
the launcher rank from ``RANK``/``WORLD_SIZE`` (torchrun, deepspeed, and our slurm scripts, which export
them), else from an ``srun`` step (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``). The batch script itself is
not an srun step: there ``SLURM_NTASKS`` counts tasks that do not run, so it is ignored, else the other
tasks' items would never be processed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from pipeline.distributed import env as env_mod


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
    where = env_mod.task_position(env)
    return TaskSlot(where.array_index * where.ranks + where.rank, where.array_count * where.ranks)


def task_count(env: Mapping[str, str] | None = None, num_tasks: int | None = None) -> int:
    """N for a step that is not one of the tasks (a commit job merging their parts): ``num_tasks`` (the
    ``--num-tasks`` flag) if given, else the count `task_slot` finds in ``env``."""
    if num_tasks is not None:
        if num_tasks < 1:
            raise ValueError(f"--num-tasks={num_tasks}: expected at least 1")
        return num_tasks
    return task_slot(env).count
