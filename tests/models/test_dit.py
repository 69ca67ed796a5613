"""DiT: every conditioning route, masks, classifier-free guidance, CFG dropout, and a one-batch overfit."""

import copy

import pytest
import torch

from pipeline.models import create_model_from_config
from pipeline.models.dit import _drop_rows

B, C, T = 2, 4, 16


def tiny_config(diffusion=None, dit=None, cantus=None, conditioners=None):
    dit_cfg = {"io_channels": C, "embed_dim": 64, "depth": 2, "num_heads": 2, "cond_token_dim": 32,
               "global_cond_dim": 32, "project_cond_tokens": True}
    dit_cfg.update(dit or {})
    diff = {"type": "dit", "cross_attention_cond_ids": ["prompt", "seconds"], "global_cond_ids": ["seconds"],
            "config": dit_cfg}
    diff.update(diffusion or {})
    model = {"io_channels": C, "diffusion": diff,
             "conditioning": {"cond_dim": 32, "configs": conditioners or [
                 {"id": "seconds", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                 {"id": "label", "type": "int", "config": {"min_val": 0, "max_val": 9}}]}}
    if cantus:
        model["cantus"] = cantus
    return {"model_type": "diffusion_cond", "sample_size": 64, "sample_rate": 16000, "model": model}


def build(**kw):
    torch.manual_seed(0)
    model = create_model_from_config(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-zero residual branches, so every input matters
        for p in model.parameters():
            if p.dim() >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model


def conditioning(model, prompt_len=5, prompt_mask=None):
    torch.manual_seed(1)
    cond = model.conditioner([{"seconds": 10.0, "label": 3}, {"seconds": 200.0, "label": 7}], "cpu")
    mask = torch.ones(B, prompt_len, dtype=torch.bool) if prompt_mask is None else prompt_mask
    cond["prompt"] = [torch.randn(B, prompt_len, 32), mask]
    return cond


X, TS = torch.randn(B, C, T, generator=torch.Generator().manual_seed(2)), torch.tensor([0.3, 0.8])


@pytest.mark.parametrize("diffusion,dit", [
    ({}, {}),
    ({}, {"global_cond_type": "adaLN"}),
    ({"prepend_cond_ids": ["label"]}, {"prepend_cond_dim": 32}),
    ({"input_concat_ids": ["chroma"]}, {"input_concat_dim": 3}),
    ({"global_cond_ids": []}, {"global_cond_dim": 0, "patch_size": 2}),
    ({}, {"timestep_cond_type": "input_concat", "timestep_embed_dim": 8}),
    ({"prepend_cond_ids": ["label"], "input_concat_ids": ["chroma"]},
     {"prepend_cond_dim": 32, "input_concat_dim": 3, "patch_size": 4, "global_cond_type": "adaLN",
      "num_memory_tokens": 2, "project_cond_tokens": False}),
])
def test_every_route_gives_output_shaped_like_input(diffusion, dit):
    model = build(diffusion=diffusion, dit=dit)
    cond = conditioning(model)
    cond["chroma"] = [torch.randn(B, 3, T // 2), None]  # resampled (nearest) to T
    for cfg_scale in (1.0, 3.0):
        out = model(X, TS, cond, cfg_scale=cfg_scale)
        assert out.shape == (B, C, T) and torch.isfinite(out).all()


def test_x_transformers_backbone_builds_and_runs():
    model = build(dit={"transformer_type": "x-transformers"})
    assert model(X, TS, conditioning(model)).shape == (B, C, T)


def test_missing_routed_tensor_is_a_clear_runtime_error():
    model = build()
    cond = conditioning(model)
    del cond["prompt"]
    with pytest.raises(KeyError, match="cross_attention_cond_ids routes 'prompt'"):
        model(X, TS, cond)


def test_masks_off_ignore_masks_as_sat_does():
    model = build()
    cond = conditioning(model)
    masked = copy.copy(cond)
    masked["prompt"] = [cond["prompt"][0], torch.tensor([[True] * 3 + [False] * 2] * B)]
    assert torch.equal(model(X, TS, cond), model(X, TS, masked))
    assert torch.equal(model(X, TS, cond, mask=torch.ones(B, T).bool()), model(X, TS, cond))


def test_masks_on_with_all_real_tokens_equal_masks_off():
    off, on = build(), build(cantus={"attention_masks": True})
    on.load_state_dict(off.state_dict())
    cond = conditioning(off)
    assert torch.allclose(off(X, TS, cond, cfg_scale=3.0), on(X, TS, cond, cfg_scale=3.0, mask=torch.ones(B, T)),
                          atol=1e-5)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_masks_on_padded_frames_change_no_real_output(patch_size):
    model = build(cantus={"attention_masks": True}, dit={"patch_size": patch_size})
    cond = conditioning(model)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 12:] = False
    noisy = X.clone()
    noisy[:, :, 12:] = 50.0
    a, b = model(X, TS, cond, mask=mask), model(noisy, TS, cond, mask=mask)
    assert (a[:, :, :12] - b[:, :, :12]).abs().max() < 1e-5


def test_masks_on_masked_context_tokens_change_no_output():
    model = build(cantus={"attention_masks": True})
    prompt_mask = torch.tensor([[True, True, True, False, False]] * B)
    cond = conditioning(model, prompt_mask=prompt_mask)
    other = copy.copy(cond)
    changed = cond["prompt"][0].clone()
    changed[:, 3:] = 9.0
    other["prompt"] = [changed, prompt_mask]
    for cfg_scale in (1.0, 3.0):
        assert (model(X, TS, cond, cfg_scale=cfg_scale) - model(X, TS, other, cfg_scale=cfg_scale)).abs().max() < 1e-5
    # and the mask does matter when the same tokens are not masked
    unmasked = copy.copy(other)
    unmasked["prompt"] = [changed, torch.ones_like(prompt_mask)]
    assert (model(X, TS, cond) - model(X, TS, unmasked)).abs().max() > 1e-4


def test_cfg_is_uncond_plus_scale_times_difference_in_one_batch():
    model = build()
    cond = conditioning(model)
    inputs = model.get_conditioning_inputs(cond)
    cond_out = model.model(X, TS, **inputs)
    null = dict(inputs, cross_attn_cond=torch.zeros_like(inputs["cross_attn_cond"]))
    uncond_out = model.model(X, TS, **null)
    guided = model(X, TS, cond, cfg_scale=4.0)
    assert torch.allclose(guided, uncond_out + 4.0 * (cond_out - uncond_out), atol=1e-5)

    neg = conditioning(model)
    neg["prompt"][0].mul_(-1)
    neg_inputs = model.get_conditioning_inputs(neg, negative=True)
    neg_out = model.model(X, TS, **dict(inputs, cross_attn_cond=neg_inputs["negative_cross_attn_cond"]))
    assert torch.allclose(model(X, TS, cond, cfg_scale=4.0, **neg_inputs),
                          neg_out + 4.0 * (cond_out - neg_out), atol=1e-5)

    cfg = uncond_out + 4.0 * (cond_out - uncond_out)
    rescaled = cfg * cond_out.std(dim=1, keepdim=True) / cfg.std(dim=1, keepdim=True)
    assert torch.allclose(model(X, TS, cond, cfg_scale=4.0, scale_phi=0.7), 0.7 * rescaled + 0.3 * cfg, atol=1e-5)


def test_cfg_interval_skips_guidance_outside_it():
    model = build()
    cond = conditioning(model)
    # v objective: sigma = sin(t pi / 2); t[0] = 0.3 -> sigma 0.45, outside [0.5, 1]. The conditioned rows come
    # from the batched CFG pass (selected on the device, no host sync), so they equal a plain pass up to rounding.
    torch.testing.assert_close(model(X, TS, cond, cfg_scale=4.0, cfg_interval=(0.5, 1.0)), model(X, TS, cond),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(model(X, TS, cond, cfg_scale=4.0, cfg_interval=(0.4, 1.0)), model(X, TS, cond))


def test_cfg_dropout_replaces_each_sample_with_null_at_the_configured_rate():
    torch.manual_seed(0)
    cond = torch.ones(20000, 3, 8)
    dropped = (_drop_rows(cond, 0.1).sum(dim=(1, 2)) == 0).float()
    assert abs(dropped.mean().item() - 0.1) < 0.01  # 5 sigma of a binomial with n = 20000
    assert ((_drop_rows(cond, 0.1).sum(dim=(1, 2)) % 24) == 0).all()  # whole samples, never parts

    model = build()
    cond = conditioning(model)
    inputs = model.get_conditioning_inputs(cond)
    null = dict(inputs, cross_attn_cond=torch.zeros_like(inputs["cross_attn_cond"]))
    assert torch.allclose(model(X, TS, cond, cfg_dropout_prob=1.0), model.model(X, TS, **null), atol=1e-6)


def test_tiny_dit_overfits_one_batch():
    model = build().train()
    target = torch.randn(B, C, T, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        loss = (model(X, TS, conditioning(model)) - target).square().mean()  # conditioners train too
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_unconditional_dit_from_sats_flat_layout():
    cfg = {"model_type": "diffusion_uncond", "sample_size": 64, "sample_rate": 16000,
           "model": {"type": "dit", "config": {"in_channels": C, "embed_dim": 64, "depth": 1, "num_heads": 2}}}
    model = create_model_from_config(cfg)
    assert model.io_channels == C and model.diffusion_objective == "v"
    assert model(X, TS).shape == (B, C, T)
    assert any(k.startswith("model.model.transformer.layers.0.") for k in model.state_dict())


def test_bf16_autocast_runs_on_cpu_and_stays_close_to_fp32():
    """CPU autocast does not lift layer_norm to fp32 as CUDA's does; the model must not depend on it."""
    model = build(dit={"global_cond_type": "adaLN"})
    cond = conditioning(model)
    reference = model(X, TS, cond, cfg_scale=3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X, TS, cond, cfg_scale=3.0)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).norm() / reference.norm() < 0.05
