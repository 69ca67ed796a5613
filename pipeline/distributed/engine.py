"""DeepSpeed setup: read a ds_config, fill its batch sizes from the command line, check them, build the engine.

`ds_configs/*.json` are the only home of ZeRO knobs; the model config owns the optimizer (SAT's
`training.optimizer_configs`). The checks here run before `deepspeed.initialize`, because DeepSpeed's own
batch-size check cannot say which file a number came from.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import Any, Callable

import torch

from pipeline.models.compile import compiled_blocks

logger = logging.getLogger(__name__)

_AUTO = "auto"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BatchLayout:
    micro_batch: int
    """Samples per rank per forward/backward (`--batch-size`)."""
    accumulation: int
    """Micro-batches per optimizer step (ds_config `gradient_accumulation_steps`)."""
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


def read_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--ds_config {path}: file not found (see ds_configs/ for the shipped ones)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--ds_config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--ds_config {path}: expected a JSON object")
    return cfg


def _number(cfg: dict, key: str, ds_path: str) -> int | None:
    """A batch key's value, None when it is absent or "auto" (then the command line fills it)."""
    value = cfg.get(key, _AUTO)
    if value == _AUTO:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{ds_path}: {key}={value!r} must be a positive integer or \"auto\"")
    return value


def resolve_batch(ds_config: dict, ds_path: str, *, micro_batch: int | None, world_size: int,
                  model_config_path: str) -> tuple[dict, BatchLayout]:
    """Fill `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps` and `train_batch_size`
    ("auto" or absent) and check `train_batch_size = micro x accumulation x world`."""
    cfg = copy.deepcopy(ds_config)
    ds_micro = _number(cfg, "train_micro_batch_size_per_gpu", ds_path)
    accumulation = _number(cfg, "gradient_accumulation_steps", ds_path) or 1
    total = _number(cfg, "train_batch_size", ds_path)
    if micro_batch is not None and ds_micro is not None and micro_batch != ds_micro:
        raise ValueError(f"--batch-size {micro_batch} disagrees with train_micro_batch_size_per_gpu={ds_micro} "
                         f"in {ds_path}: set one of them (\"auto\" in the ds_config takes --batch-size)")
    micro = micro_batch if micro_batch is not None else ds_micro
    if micro is None:
        if total is None:
            raise ValueError(f"no batch size: pass --batch-size or set train_micro_batch_size_per_gpu in {ds_path}")
        if total % (accumulation * world_size):
            raise ValueError(f"{ds_path}: train_batch_size={total} is not divisible by gradient_accumulation_steps="
                             f"{accumulation} x world size {world_size}")
        micro = total // (accumulation * world_size)
    layout = BatchLayout(micro_batch=micro, accumulation=accumulation, world_size=world_size)
    if total is not None and total != layout.global_batch:
        raise ValueError(
            f"train_batch_size={total} in {ds_path} != micro batch {micro} x gradient_accumulation_steps "
            f"{accumulation} x world size {world_size} = {layout.global_batch} (model config {model_config_path}, "
            f"micro batch from --batch-size or the ds_config): set train_batch_size to \"auto\" or "
            f"{layout.global_batch}, or change --batch-size")
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = layout.global_batch
    return cfg, layout


def check_optimizer_source(ds_config: dict, ds_path: str, *, model_has_optimizer: bool,
                           model_config_path: str) -> None:
    """One home for the optimizer: the model config's `training.optimizer_configs`, or the ds_config's
    `optimizer`/`scheduler` blocks, never both (DeepSpeed would silently prefer one)."""
    ds_blocks = [k for k in ("optimizer", "scheduler") if k in ds_config]
    if ds_blocks and model_has_optimizer:
        raise ValueError(
            f"optimizer defined twice: {ds_path} has {' and '.join(repr(b) for b in ds_blocks)} and "
            f"{model_config_path} has training.optimizer_configs; remove one (Cantus ds_configs leave the "
            f"optimizer to the model config)")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def precision(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the module's weights in."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def build_engine(module: torch.nn.Module, ds_config: dict, *,
                 optimizer: torch.optim.Optimizer | Callable | None = None,
                 lr_scheduler: Callable | None = None) -> Any:
    """`deepspeed.initialize` on the trainable parameters only. `optimizer`: a torch optimizer or a callable
    taking the parameter list (None uses the ds_config's block); `lr_scheduler`: a callable taking the
    optimizer, so it wraps the optimizer DeepSpeed actually steps."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    if zero_stage(ds_config) == 3:
        from deepspeed.utils.z3_leaf_module import set_z3_leaf_module

        # A compiled block is one ZeRO-3 "leaf": its parameters are gathered by one hook before the block,
        # not by hooks on each Linear inside it, which would break the compiled graph at every layer.
        for block in compiled_blocks(module):
            set_z3_leaf_module(block, True)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler, config=ds_config)
    return engine
