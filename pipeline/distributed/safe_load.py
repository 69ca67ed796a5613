"""The one place Cantus lets DeepSpeed unpickle a checkpoint file: weights only, with a short allowlist.

A checkpoint folder is read from storage, so it is untrusted: a pickle planted under a name DeepSpeed reads
(`mp_rank_*_model_states.pt`, `[bf16_]zero_pp_rank_*_optim_states.pt`, ...) must not run code. DeepSpeed
0.19.8 itself turns weights-only loading off in its own `torch.load` calls (`TorchCheckpointEngine.load`,
`utils/zero_to_fp32`, the base and ZeRO-3 optimizers' load paths), so an allowlist alone would change nothing. Every DeepSpeed call
that reads a checkpoint (`engine.load_checkpoint`, the ZeRO-to-fp32 consolidation) runs inside
`weights_only_loads()`, which replaces `torch.load` for the duration of the call with `load_weights_only`:
tensors, plain containers and `ALLOWED_GLOBALS`, nothing else. We do not fork DeepSpeed.

The replacement is process-wide while it lasts; checkpoint loads run on the main thread of a stage, and no
other thread of ours calls `torch.load`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from pipeline.models.weights import unpickling_error

_TORCH_LOAD = torch.load
"""The real `torch.load`, taken at import, before any override."""


def allowed_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoints (checked for ZeRO 0-3, fp32 and
    bf16, on CPU); all live in the optimizer state files. Our own client state is plain ints and strings
    (`pipeline.distributed.checkpoint.save`); RNG states and the data position go to safetensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # optimizer state "loss_scaler" (fp16/bf16 and ZeRO)
    from deepspeed.runtime.zero.config import ZeroStageEnum  # ZeRO optimizer state "zero_stage"
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 "param_slice_mappings"

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """`torch.load`'s signature, always weights-only with `allowed_globals()`, whatever the caller asked.
    A file that needs anything else, or is not a torch file, is a ValueError naming it (one line)."""
    if pickle_module is not None:
        raise TypeError("load_weights_only: a custom pickle_module cannot be used for weights-only loading")
    name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<stream>")
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted by unpickling_error: file faults become ValueErrors
            raise unpickling_error(str(name), e) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every `torch.load` (DeepSpeed's included) is `load_weights_only`."""
    previous = torch.load
    torch.load = load_weights_only
    try:
        yield
    finally:
        torch.load = previous
