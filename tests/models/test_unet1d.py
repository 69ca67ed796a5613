"""ADP U-Net backbones (`adp_cfg_1d`, `adp_1d`, `adp_uncond_1d`): SAT's layout, SAT's outputs, CFG, training."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.factory import create_model_from_config
from pipeline.models.unet1d import UNet1d, UNet1DCondWrapper, UNet1DUncondWrapper, UNetCFG1d, UNetCFG1DWrapper

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SA1 = FIXTURES / "sat_configs/model_configs/txt2audio/stable_audio_1_0.json"


def sa1_backbone_config() -> dict:
    return json.loads(SA1.read_text())["model"]["diffusion"]["config"]


def scaled_sa1_config() -> dict:
    """SA 1.0's backbone block with small widths and the same key structure (every level, block and
    attention count kept; widths 32/64 so that GroupNorm(32) in the transformers still applies)."""
    return dict(
        sa1_backbone_config(),
        in_channels=4, context_embedding_features=16, context_embedding_max_length=5, channels=32,
        resnet_groups=4, multipliers=[1, 1, 1, 2, 2], attention_heads=2, attention_multiplier=1,
    )


def meta_layout(module: torch.nn.Module, prefix: str = "") -> dict:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def sa1_meta_backbone():
    with torch.device("meta"):
        return UNetCFG1DWrapper(**sa1_backbone_config())


def test_sa1_backbone_builds_on_meta_with_sat_keys_and_shapes(sa1_meta_backbone):
    ref = json.loads((FIXTURES / "sat_ref/keys_sa1.json").read_text())
    expected = {k: v["shape"] for k, v in ref["keys"].items() if k.startswith("model.")}
    backbone = sa1_meta_backbone
    assert meta_layout(backbone, "model.") == expected
    assert sum(p.numel() for p in backbone.parameters()) == 906_679_744
    assert backbone.min_input_length == 16  # factors [1, 2, 2, 4]


def test_sa1_full_model_from_factory_matches_sat_layout():
    """Through create_model_from_config, less what keys_sa1.json's `modifications` removed (CLAP, no state
    in SAT) and the DAC VAE (its layout is checked in test_sat_reference.py)."""
    ref = json.loads((FIXTURES / "sat_ref/keys_sa1.json").read_text())
    raw = json.loads(SA1.read_text())
    del raw["model"]["pretransform"]
    raw["model"]["conditioning"]["configs"] = [
        c for c in raw["model"]["conditioning"]["configs"] if c["type"] != "clap_text"
    ]
    raw["model"]["diffusion"]["cross_attention_cond_ids"] = ["seconds_start", "seconds_total"]
    with torch.device("meta"):
        model = create_model_from_config(raw)
    expected = {k: v["shape"] for k, v in ref["keys"].items() if not k.startswith("pretransform.")}
    assert meta_layout(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 907_467_712


# ---- SAT's recorded outputs (tests/fixtures/unet1d/make_refs.py ran SAT's adp.py at 50049e37) ----

REF = json.loads((FIXTURES / "unet1d/ref_adp.json").read_text())


@pytest.fixture(scope="module")
def adp_ref():
    return load_file(str(FIXTURES / "unet1d/ref_adp.safetensors"))


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", list(REF["cases"]))
def test_cfg_unet_matches_sat_reference(adp_ref, case):
    model = UNetCFG1d(**REF["cfg_config"])
    model.load_state_dict(_sub(adp_ref, "sd_cfg."), strict=True)
    inputs = _sub(adp_ref, "in.")
    kwargs = dict(REF["cases"][case])
    if kwargs.pop("negative", False):
        kwargs |= {"negative_embedding": inputs["negative_embedding"],
                   "negative_embedding_mask": inputs["negative_embedding_mask"].bool()}
    with torch.no_grad():
        out = model(inputs["x"], inputs["t"], embedding=inputs["embedding"],
                    embedding_mask=inputs["embedding_mask"].bool(), features=inputs["features"],
                    channels_list=[inputs["channels"]], **kwargs)
    expected = adp_ref[f"out.{case}"]
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_uncond_unet_with_nearest_upsampling_matches_sat_reference(adp_ref):
    model = UNet1d(**REF["uncond_config"])
    model.load_state_dict(_sub(adp_ref, "sd_uncond."), strict=True)
    with torch.no_grad():
        out = model(adp_ref["in.x_uncond"], adp_ref["in.t_uncond"])
    torch.testing.assert_close(out, adp_ref["out.uncond"], rtol=1e-4, atol=1e-5)


# ---- CFG behaviour ----

def _tiny_cfg(**overrides) -> UNetCFG1d:
    torch.manual_seed(0)
    config = dict(in_channels=2, channels=32, multipliers=[1, 1], factors=[2], num_blocks=[1], attentions=[1, 1],
                  attention_heads=2, attention_multiplier=1, resnet_groups=4, context_features_multiplier=1,
                  context_embedding_features=8, context_embedding_max_length=4)
    return UNetCFG1d(**(config | overrides)).eval()


def test_cfg_combines_conditional_and_null_outputs_by_the_formula():
    model = _tiny_cfg()
    x, t, emb = torch.randn(2, 2, 8), torch.rand(2), torch.randn(2, 3, 8)
    with torch.no_grad():
        cond = model(x, t, embedding=emb)
        null = model(x, t, embedding=model.fixed_embedding(emb))
        guided = model(x, t, embedding=emb, embedding_scale=4.0, batch_cfg=True)
        unbatched = model(x, t, embedding=emb, embedding_scale=4.0, batch_cfg=False)
        rescaled = model(x, t, embedding=emb, embedding_scale=4.0, batch_cfg=True, rescale_cfg=True, scale_phi=0.5)
        dropped = model(x, t, embedding=emb, embedding_mask_proba=1.0)
    cfg = null + 4.0 * (cond - null)
    torch.testing.assert_close(guided, cfg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unbatched, cfg, atol=1e-5, rtol=1e-5)
    expected = 0.5 * cfg * cond.std(dim=1, keepdim=True) / cfg.std(dim=1, keepdim=True) + 0.5 * cfg
    torch.testing.assert_close(rescaled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped, null)
    assert (cond - null).abs().max() > 1e-3  # the null embedding is a different condition


def test_masked_tokens_do_not_influence_the_output():
    model = _tiny_cfg()
    x, t, emb = torch.randn(2, 2, 8), torch.rand(2), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    other = emb.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 8) * 10
    with torch.no_grad():
        a = model(x, t, embedding=emb, embedding_mask=mask)
        b = model(x, t, embedding=other, embedding_mask=mask)
        unmasked = model(x, t, embedding=emb)
    torch.testing.assert_close(a, b)
    assert (a - unmasked).abs().max() > 1e-4


def test_time_token_with_negative_prompt_equal_to_positive_gives_the_conditional_output():
    """SAT fails here (the time token is appended to the positive tokens only); with the negative prompt
    equal to the positive one, guidance must return the conditional output."""
    model = _tiny_cfg(use_xattn_time=True)
    x, t, emb = torch.randn(2, 2, 8), torch.rand(2), torch.randn(2, 4, 8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        cond = model(x, t, embedding=emb, embedding_mask=mask)
        guided = model(x, t, embedding=emb, embedding_mask=mask, embedding_scale=5.0, batch_cfg=True,
                       negative_embedding=emb, negative_embedding_mask=mask)
    torch.testing.assert_close(guided, cond, atol=1e-5, rtol=1e-5)


def test_too_many_tokens_name_context_embedding_max_length():
    model = _tiny_cfg()
    with pytest.raises(ValueError, match="exceed context_embedding_max_length 4"):
        model(torch.randn(1, 2, 8), torch.rand(1), embedding=torch.randn(1, 5, 8))


def test_length_not_a_multiple_of_the_factors_names_the_minimum_length():
    model = UNet1d(in_channels=2, channels=8, multipliers=[1, 1, 1], factors=[2, 3], num_blocks=[1, 1],
                   attentions=[0, 0, 0], patch_size=2, resnet_groups=2)
    with pytest.raises(ValueError, match=r"not a multiple of 12 .*the minimum length is 12"):
        model(torch.randn(1, 2, 18), torch.rand(1))
    assert model(torch.randn(1, 2, 24), torch.rand(1)).shape == (1, 2, 24)


# ---- scaled-down copies: same keys as the full config, train a step, overfit a batch ----

def _overfit(model, forward, steps=60, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = forward()
        opt.zero_grad()
        loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
            assert not missing, f"no finite gradient for {missing}"
        opt.step()
        losses.append(loss.item())
    return losses


def test_scaled_sa1_keeps_the_key_structure_and_overfits_one_batch(sa1_meta_backbone):
    torch.manual_seed(0)
    model = UNetCFG1DWrapper(**scaled_sa1_config())
    assert set(model.state_dict()) == set(sa1_meta_backbone.state_dict())
    x, t, target = torch.randn(2, 4, 16), torch.rand(2), torch.randn(2, 4, 16)
    tokens, mask = torch.randn(2, 3, 16), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])

    def loss():  # the conditional pass plus the CFG-dropped pass, so every parameter gets a gradient
        cond = model(x, t, cross_attn_cond=tokens, cross_attn_mask=mask)
        null = model(x, t, cross_attn_cond=tokens, cross_attn_mask=mask, cfg_dropout_prob=1.0)
        return ((cond - target) ** 2).mean() + ((null - target) ** 2).mean()

    losses = _overfit(model, loss, steps=20)
    assert losses[-1] < 0.2 * losses[0], losses[::5]


def test_adp_1d_with_global_and_input_concat_conditioning_overfits_and_uses_them():
    torch.manual_seed(0)
    model = UNet1DCondWrapper(in_channels=2, channels=16, multipliers=[1, 2, 2], factors=[2, 2], num_blocks=[1, 1],
                              attentions=[0, 0, 0], resnet_groups=4, context_features=3, context_channels=[1])
    x, t = torch.randn(1, 2, 16).expand(2, -1, -1), torch.full((2,), 0.5)
    glob = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    concat = torch.randn(2, 1, 8)  # half length: resized to the input's (nearest), as in SAT
    target = torch.randn(1, 2, 16) * torch.tensor([1.0, -1.0]).view(2, 1, 1)  # opposite targets, same input
    losses = _overfit(model, lambda: ((model(x, t, global_cond=glob, input_concat_cond=concat) - target) ** 2).mean())
    floor = (target ** 2).mean().item()  # the best any model ignoring its conditioning can do
    assert losses[-1] < 0.2 * floor, (losses[::10], floor)


def test_adp_uncond_1d_and_its_docs_name_build_the_same_model_and_overfit():
    config = {"model_type": "diffusion_uncond", "sample_size": 64, "sample_rate": 16000,
              "model": {"type": "adp_uncond_1d",
                        "config": {"in_channels": 2, "channels": 16, "multipliers": [1, 2], "factors": [4],
                                   "num_blocks": [1], "attentions": [0, 0], "resnet_groups": 4}}}
    docs_name = copy.deepcopy(config)
    docs_name["model"]["type"] = "adp_1d"
    with torch.device("meta"):
        a, b = create_model_from_config(config), create_model_from_config(docs_name)
    assert isinstance(a.model, UNet1DUncondWrapper) and meta_layout(a) == meta_layout(b)
    assert a.min_input_length == 4 and a.model.io_channels == 2
    torch.manual_seed(0)
    model = UNet1DUncondWrapper(**config["model"]["config"])
    x, t, target = torch.randn(2, 2, 16), torch.rand(2), torch.randn(2, 2, 16)
    losses = _overfit(model, lambda: ((model(x, t) - target) ** 2).mean())
    assert losses[-1] < 0.2 * losses[0]


def test_unknown_backbone_key_is_an_error_naming_it():
    raw = {"model_type": "diffusion_uncond", "sample_size": 64, "sample_rate": 16000,
           "model": {"type": "adp_uncond_1d",
                     "config": {"in_channels": 2, "channels": 16, "multipliers": [1, 2], "factors": [4],
                                "num_blocks": [1], "attentions": [0, 0], "resnet_group": 4}}}
    with pytest.raises(ValueError, match=r"model.config: unknown argument\(s\) \['resnet_group'\]"):
        create_model_from_config(raw)
