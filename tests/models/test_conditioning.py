"""Typed conditioning: the router's one value, `predict(x, t, cond, guidance)` on every conditioned backbone
(equal to SAT's keyword call), and routes checked when the model is built."""

import dataclasses

import pytest
import torch

from pipeline.config_json import ConfigError
from pipeline.diffusion import Guidance
from pipeline.models import create_model_from_config
from pipeline.models.conditioning import Conditioning
from pipeline.models.unet1d import UNet1DCondWrapper
from test_dit import B, C, T, TS, X, build, conditioning, tiny_config  # tests/models is on sys.path

UNET = {"in_channels": C, "channels": 32, "multipliers": [1, 1], "factors": [2], "num_blocks": [1],
        "attentions": [0, 1], "attention_heads": 2, "attention_multiplier": 1, "resnet_groups": 4}
BACKBONES = {  # backbone -> the model.diffusion block of a tiny conditioned model
    "dit": {},
    "adp_cfg_1d": {"type": "adp_cfg_1d", "cross_attention_cond_ids": ["prompt", "seconds"],
                   "global_cond_ids": ["seconds"],
                   "config": UNET | {"context_embedding_features": 32, "context_embedding_max_length": 8,
                                     "context_features": 32}},
    "adp_1d": {"type": "adp_1d", "cross_attention_cond_ids": [], "global_cond_ids": ["seconds"],
               "config": UNET | {"context_features": 32}},
    "DAU1d": {"type": "DAU1d", "cross_attention_cond_ids": [], "global_cond_ids": ["seconds"],
              "config": {"io_channels": C, "depth": 3, "n_attn_layers": 0, "channels": [8, 16, 16], "cond_dim": 32}},
}


def test_the_router_returns_one_frozen_value_that_sats_keyword_dict_is_read_from():
    model = build()
    cond = conditioning(model)
    routed = model.route(cond)
    assert isinstance(routed, Conditioning)
    assert routed.cross_attn.shape == (B, 6, 32) and routed.global_cond.shape == (B, 32)  # prompt 5 + seconds 1
    assert routed.prepend is None and routed.negative_cross_attn is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        routed.cross_attn = None
    sat = model.get_conditioning_inputs(cond)
    assert set(sat) == {"cross_attn_cond", "cross_attn_mask", "global_cond", "input_concat_cond", "prepend_cond",
                        "prepend_cond_mask"}
    assert torch.equal(sat["cross_attn_cond"], routed.cross_attn)
    negative = model.route(cond, cond)
    assert torch.equal(negative.negative_cross_attn, routed.cross_attn)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_predict_with_typed_conditioning_equals_sats_keyword_call_on_every_backbone(backbone):
    model = build(diffusion=BACKBONES[backbone])
    cond = conditioning(model)
    negative = conditioning(model, prompt_mask=torch.tensor([[True] * 3 + [False] * 2] * B))
    negative["prompt"][0] = negative["prompt"][0].flip(0)
    typed = Guidance(scale=3.0, batch=True, scale_phi=0.5)
    with torch.no_grad():
        expected = model(X, TS, cond, cfg_scale=3.0, batch_cfg=True, rescale_cfg=True, scale_phi=0.5,
                         **model.get_conditioning_inputs(negative, negative=True))
        out = model.predict(X, TS, model.route(cond, negative), typed)
        plain = model.predict(X, TS, model.route(cond), Guidance())
    assert out.shape == (B, C, T)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if backbone in ("dit", "adp_cfg_1d"):  # the two that guide
        assert not torch.allclose(out, plain)


@pytest.mark.parametrize("route, backbone, message", [
    ("cross_attention_cond_ids", "adp_1d", r"model\.diffusion\.cross_attention_cond_ids=\['prompt'\]: the "
                                           r"'adp_1d' backbone has no such input; route these ids through "
                                           r"global_cond_ids or input_concat_ids"),
    ("cross_attention_cond_ids", "DAU1d", r"model\.diffusion\.cross_attention_cond_ids=\['prompt'\]: the 'DAU1d'"),
])
def test_a_route_the_backbone_has_no_input_for_is_a_config_error_at_build(route, backbone, message):
    diffusion = BACKBONES[backbone] | {route: ["prompt"]}
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        create_model_from_config(tiny_config(diffusion=diffusion))


def test_adp_cfg_1d_without_cross_attention_ids_is_a_config_error_at_build():
    diffusion = BACKBONES["adp_cfg_1d"] | {"cross_attention_cond_ids": []}
    with torch.device("meta"), pytest.raises(ConfigError, match=r"model\.diffusion\.cross_attention_cond_ids is "
                                                                r"empty: the 'adp_cfg_1d' backbone needs"):
        create_model_from_config(tiny_config(diffusion=diffusion))


def test_a_direct_keyword_call_with_an_input_the_backbone_lacks_names_the_route():
    model = UNet1DCondWrapper(**UNET)
    with pytest.raises(ValueError, match="adp_1d takes no cross_attention_cond_ids conditioning"):
        model(X, TS, cross_attn_cond=torch.randn(B, 3, 8))


def test_a_unet_refuses_a_cfg_interval_and_a_padding_mask_on_the_typed_path():
    model = build(diffusion=BACKBONES["adp_1d"])
    routed = model.route(conditioning(model))
    with pytest.raises(ValueError, match="cfg_interval .* needs the dit backbone"):
        model.predict(X, TS, routed, Guidance(interval=(0.2, 0.8)))
    with pytest.raises(ValueError, match="has no padding mask"):
        model.predict(X, TS, routed, Guidance(), mask=torch.ones(B, T, dtype=torch.bool))


def test_the_unconditional_backbones_take_the_same_typed_call():
    from pipeline.models.dance_unet import DAU1DUncond
    from pipeline.models.unet1d import UNet1DUncondWrapper
    torch.manual_seed(0)
    for model in (UNet1DUncondWrapper(**UNET), DAU1DUncond(io_channels=C, depth=3, n_attn_layers=0,
                                                           channels=[8, 16, 16])):
        assert model.accepts == frozenset()
        with torch.no_grad():
            torch.testing.assert_close(model.predict(X, TS, Conditioning(), Guidance()), model(X, TS), rtol=0, atol=0)
