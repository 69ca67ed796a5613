"""Regional compilation: `torch.compile` applied to each transformer block of a built model, from outside.

As torchtitan's `apply_compile` (torchtitan/models/llama3/infra/parallelize.py) does, every block is compiled on
its own instead of the whole network: identical blocks share one compiled graph, so compile time is that of one
block (not of depth x block), and everything around the blocks stays eager:

- activation checkpointing (`torch.utils.checkpoint` around a block, in `ContinuousTransformer.forward`) re-runs
  the compiled block on backward;
- ZeRO-3's parameter hooks (DeepSpeed marks them `torch.compiler.disable`) run between compiled regions:
  `pipeline.distributed.engine` makes each compiled block a ZeRO-3 leaf module, so one hook gathers the block's
  parameters before it and none fires inside it (a hook inside would break the graph at every layer);
- classifier-free guidance, CFG dropout and the conditioners are eager code, so a changed `cfg_dropout_prob`,
  `cfg_scale` or `cfg_interval` never recompiles.

`nn.Module.compile` compiles in place: parameter names and state dicts are unchanged (a `torch.compile` wrapper
module would prefix them with `_orig_mod.`), so checkpoints load into compiled and eager models alike.

What recompiles a block (each a few seconds to a minute once per process, see docs/architecture.md): a new input
shape (batch size, latent length, context length; after the second distinct size dynamo marks that dimension
dynamic), a new dtype (autocast on/off, bf16 vs fp32), grad mode (training vs sampling are separate graphs),
and None-ness of an input (masks, adaLN conditioning).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.models.transformer import ContinuousTransformer

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 32
"""Graphs dynamo keeps per compiled code object (its default is 8). All blocks share one code object, and a
run with demos sees training, CFG sampling and plain sampling shapes, in eager and autocast: more than 8."""


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of every `ContinuousTransformer` in `model` (the DiT backbone's `transformer.layers`)."""
    return [block for m in model.modules() if isinstance(m, ContinuousTransformer) for block in m.layers]


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model` that `compile_blocks` compiled."""
    return [block for block in transformer_blocks(model) if block._compiled_call_impl is not None]


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile each transformer block of `model` in place (`options` go to `torch.compile`); returns how many.

    Raises ValueError when the model has none (U-Net backbones, x-transformers): nothing would be compiled."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError("model.cantus.compile=true: the model has no continuous_transformer blocks to compile "
                         "(only dit backbones with transformer_type 'continuous_transformer' are compiled); "
                         "set it to false")
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    for block in blocks:
        block.compile(**options)
    logger.info("compiled %d transformer blocks (regional torch.compile; the first call of each shape compiles)",
                len(blocks))
    return len(blocks)
