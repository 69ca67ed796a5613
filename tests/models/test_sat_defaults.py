"""Every model-facing call keeps stable-audio-tools' keyword defaults (SAT commit 50049e3).

`TABLE` lists, per call, each keyword with SAT's default and ours, read from SAT's source at that commit
(`models/dit.py`, `diffusion.py`, `adp.py`, `conditioners.py`, `autoencoders.py`, `pretransforms.py`).
`NO` marks a keyword one side does not take. Where SAT's value reaches the call through `**kwargs` (for
example `scale_phi` into `UNetCFG1d.forward`), the SAT column holds that effective default. A keyword only
one side takes needs a reason in `WHY`; a keyword both take must have the same default: a changed default
is an incompatibility. Our keyword that SAT lacks raises `TypeError` in SAT or is swallowed by its
`**kwargs`; SAT's keyword that we lack raises `TypeError` here (we take no `**kwargs`), never silently.
"""

import inspect

import pytest

from pipeline.models import conditioners as cond
from pipeline.models.autoencoder import AudioAutoencoder
from pipeline.models.dance_unet import DAU1DCondWrapper, DAU1DUncond, DiffusionAttnUnet1D
from pipeline.models.diffusion_wrapper import (ConditionedDiffusionModelWrapper, DiffusionModelWrapper,
                                               DiTUncondWrapper, DiTWrapper)
from pipeline.models.dit import DiffusionTransformer
from pipeline.models.pretransforms import AutoencoderPretransform, PatchedPretransform, PQMFPretransform
from pipeline.models.unet1d import UNet1d, UNet1DCondWrapper, UNet1DUncondWrapper, UNetCFG1d, UNetCFG1DWrapper

NO = "not a keyword"
REQ = "required keyword"

_ROUTED = {  # what SAT's ConditionedDiffusionModelWrapper sends every conditioned backbone
    "cross_attn_cond": (None, None), "cross_attn_mask": (None, None), "input_concat_cond": (None, None),
    "global_cond": (None, None), "negative_cross_attn_cond": (None, None), "negative_cross_attn_mask": (None, None),
    "negative_global_cond": (None, None), "negative_input_concat_cond": (None, None),
    "prepend_cond": (None, None), "prepend_cond_mask": (None, None),
    "cfg_scale": (1.0, 1.0), "cfg_dropout_prob": (0.0, 0.0),
}
_DIT = {
    "cross_attn_cond": (None, None), "cross_attn_cond_mask": (None, None), "negative_cross_attn_cond": (None, None),
    "negative_cross_attn_mask": (None, None), "input_concat_cond": (None, None), "global_embed": (None, None),
    "negative_global_embed": (None, None), "prepend_cond": (None, None), "prepend_cond_mask": (None, None),
    "cfg_scale": (1.0, 1.0), "cfg_dropout_prob": (0.0, 0.0), "cfg_interval": ((0, 1), (0.0, 1.0)),
    "scale_phi": (0.0, 0.0), "mask": (None, None),
    "causal": (False, NO), "return_info": (False, NO), "exit_layer_ix": (None, NO),
}
_UNET1D = {"time": (None, None), "features": (None, None), "channels_list": (None, None), "embedding": (None, None),
           "embedding_mask": (None, None), "causal": (False, NO)}

# call -> (ours, {keyword: (SAT's default, ours)})
TABLE = {
    "DiffusionTransformer.forward": (DiffusionTransformer.forward, _DIT),
    "DiTWrapper.forward": (DiTWrapper.forward, {
        **_ROUTED, "batch_cfg": (True, True), "rescale_cfg": (False, False), "scale_phi": (0.0, 0.0),
        "cfg_interval": ((0, 1), (0.0, 1.0)), "mask": (None, None),
        "causal": (False, NO), "return_info": (False, NO), "exit_layer_ix": (None, NO)}),
    "DiTUncondWrapper.forward": (DiTUncondWrapper.forward, {
        **{k: (sat, NO) for k, (sat, _) in _DIT.items()},
        "mask": (None, None), "cfg_dropout_prob": (0.0, 0.0), "cfg_scale": (1.0, 1.0)}),
    "UNetCFG1DWrapper.forward": (UNetCFG1DWrapper.forward, {
        **_ROUTED, "batch_cfg": (False, False), "rescale_cfg": (False, False), "scale_phi": (0.4, 0.4),
        "cfg_interval": (NO, (0.0, 1.0)), "mask": (NO, None), "causal": (False, NO)}),
    "UNetCFG1d.forward": (UNetCFG1d.forward, {
        "embedding": (REQ, REQ), "embedding_mask": (None, None), "embedding_scale": (1.0, 1.0),
        "embedding_mask_proba": (0.0, 0.0), "batch_cfg": (False, False), "rescale_cfg": (False, False),
        "scale_phi": (0.4, 0.4), "negative_embedding": (None, None), "negative_embedding_mask": (None, None),
        "features": (None, None), "channels_list": (None, None), "causal": (False, NO)}),
    "UNet1DCondWrapper.forward": (UNet1DCondWrapper.forward, {
        **_ROUTED, "batch_cfg": (False, False), "rescale_cfg": (False, False), "scale_phi": (NO, 0.4),
        "cfg_interval": (NO, (0.0, 1.0)), "mask": (NO, None), "causal": (False, NO)}),
    "UNet1DUncondWrapper.forward": (UNet1DUncondWrapper.forward, {
        **{k: (sat, NO) for k, (sat, _) in _UNET1D.items() if k != "time"},
        "mask": (NO, None), "cfg_dropout_prob": (NO, 0.0), "cfg_scale": (NO, 1.0)}),
    "UNet1d.forward": (UNet1d.forward, _UNET1D),
    "DAU1DCondWrapper.forward": (DAU1DCondWrapper.forward, {
        **_ROUTED, "batch_cfg": (False, False), "rescale_cfg": (False, False), "scale_phi": (NO, 0.4),
        "cfg_interval": (NO, (0.0, 1.0)), "mask": (NO, None), "cond_aug_scale": (NO, None)}),
    "DiffusionAttnUnet1D.forward": (DiffusionAttnUnet1D.forward, {"cond": (None, None), "cond_aug_scale": (None, None)}),
    "DAU1DUncond.forward": (DAU1DUncond.forward, {
        "cond": (None, NO), "cond_aug_scale": (None, NO),
        "mask": (NO, None), "cfg_dropout_prob": (NO, 0.0), "cfg_scale": (NO, 1.0)}),
    "ConditionedDiffusionModelWrapper.forward": (ConditionedDiffusionModelWrapper.forward, {}),
    "ConditionedDiffusionModelWrapper.get_conditioning_inputs": (
        ConditionedDiffusionModelWrapper.get_conditioning_inputs, {"negative": (False, False)}),
    "DiffusionModelWrapper.forward": (DiffusionModelWrapper.forward, {"cond": (NO, None)}),
    "AudioAutoencoder.encode": (AudioAutoencoder.encode, {
        "skip_bottleneck": (False, False), "return_info": (False, False), "skip_pretransform": (False, False),
        "iterate_batch": (False, False), "chunked": (NO, False), "chunk_size": (NO, 128), "overlap": (NO, 32),
        "generator": (NO, None)}),
    "AudioAutoencoder.decode": (AudioAutoencoder.decode, {
        "skip_bottleneck": (False, False), "iterate_batch": (False, False),
        "chunked": (NO, False), "chunk_size": (NO, 128), "overlap": (NO, 32)}),
    "AudioAutoencoder.encode_audio": (AudioAutoencoder.encode_audio, {
        "chunked": (False, False), "overlap": (32, 32), "chunk_size": (128, 128), "iterate_batch": (False, False),
        "generator": (NO, None)}),
    "AudioAutoencoder.decode_audio": (AudioAutoencoder.decode_audio, {
        "chunked": (False, False), "overlap": (32, 32), "chunk_size": (128, 128), "iterate_batch": (False, False)}),
    "AutoencoderPretransform.encode": (AutoencoderPretransform.encode, {"generator": (NO, None)}),
    "AutoencoderPretransform.decode": (AutoencoderPretransform.decode, {}),
    "PQMFPretransform.encode": (PQMFPretransform.encode, {}),
    "PQMFPretransform.decode": (PQMFPretransform.decode, {}),
    "PatchedPretransform.encode": (PatchedPretransform.encode, {}),
    "PatchedPretransform.decode": (PatchedPretransform.decode, {}),
    "IntConditioner.forward": (cond.IntConditioner.forward, {"device": (None, None)}),
    "NumberConditioner.forward": (cond.NumberConditioner.forward, {"device": (None, None)}),
    "T5Conditioner.forward": (cond.T5Conditioner.forward, {}),
    "CLAPTextConditioner.forward": (cond.CLAPTextConditioner.forward, {"device": ("cuda", "cuda")}),
    "MultiConditioner.forward": (cond.MultiConditioner.forward, {}),
    "HFTextConditioner.forward": (cond.HFTextConditioner.forward, {}),  # ours only; device required, as T5's
}

# Why a keyword is taken by one side only (by keyword, or "call:keyword" where one call differs).
WHY = {
    "causal": "SAT asserts causal=False (DiT) or would need causal convolutions (ADP), which are not ported",
    "return_info": "the DiT's per-layer info output is not ported; asking for it is a TypeError, not a silent no",
    "exit_layer_ix": "early exit from the DiT's block stack is not ported",
    "cfg_interval": "our sampler sends the DiT's CFG interval to every backbone; a U-Net rejects any other "
                    "than (0, 1) instead of SAT's silent swallow",
    "mask": "the training loop sends the padding mask to every backbone; a U-Net rejects one",
    "scale_phi": "our generation sends the rescale amount to every backbone (SAT: TypeError in UNet1d.forward "
                 "for adp_1d, swallowed by DAU1d's **kwargs); unused there",
    "cond_aug_scale": "lets a caller fix DAU1d's conditioning noise level (SAT's wrapper never passes one)",
    "DiTUncondWrapper.forward": "an unconditional model takes no conditioning: only mask and the CFG "
                                "arguments the training loop sends",
    "UNet1DUncondWrapper.forward": "an unconditional model takes no conditioning; the training loop's mask "
                                   "and CFG arguments are accepted",
    "DAU1DUncond.forward": "an unconditional model takes no conditioning; the training loop's mask and CFG "
                           "arguments are accepted",
    "DiffusionModelWrapper.forward": "cond lets the training loop call conditioned and unconditional models alike",
    "chunked": "our encode/decode do the chunking of SAT's encode_audio/decode_audio themselves",
    "chunk_size": "as chunked",
    "overlap": "as chunked",
    "generator": "every random draw takes a generator, so pre-encoding and tests repeat",
}


def _ours(fn) -> dict:
    """Our keywords: every parameter with a default, and required keyword-only ones."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            out[name] = p.default
        elif p.kind is p.KEYWORD_ONLY:
            out[name] = REQ
    return out


@pytest.mark.parametrize("call", sorted(TABLE))
def test_every_keyword_of_the_call_is_in_the_table_with_our_default(call):
    fn, rows = TABLE[call]
    assert _ours(fn) == {k: ours for k, (_, ours) in rows.items() if ours is not NO}


@pytest.mark.parametrize("call", sorted(TABLE))
def test_a_keyword_both_sides_take_has_sats_default_and_one_side_only_has_a_reason(call):
    _, rows = TABLE[call]
    for kwarg, (sat, ours) in rows.items():
        if sat is NO or ours is NO:
            assert kwarg in WHY or call in WHY, f"{call}({kwarg}): taken by one side only, with no reason"
        else:
            assert sat == ours, f"{call}({kwarg}): SAT's default {sat!r}, ours {ours!r}"


def test_the_adp_wrappers_no_longer_guide_in_a_batch_or_rescale_unless_asked():
    """The drift the table was made for: SAT's adp/DAU wrappers default both flags to False."""
    for fn in (UNetCFG1DWrapper.forward, UNet1DCondWrapper.forward, DAU1DCondWrapper.forward):
        defaults = _ours(fn)
        assert (defaults["batch_cfg"], defaults["rescale_cfg"]) == (False, False)
