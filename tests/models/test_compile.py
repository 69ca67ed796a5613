"""Regional compilation (`model.cantus.compile`): the same numbers as eager, the same state dict, and no graph
break in the DiT's training forward or in a guided (CFG) call with a CFG interval."""

import pytest
import torch

from pipeline.config_json import ConfigError
from pipeline.models import create_model_from_config
from pipeline.models.compile import transformer_blocks

B, C, T = 2, 4, 16


def tiny_config(compile_blocks: bool, backbone: str = "dit") -> dict:
    dit = {"io_channels": C, "embed_dim": 64, "depth": 2, "num_heads": 2, "cond_token_dim": 32,
           "global_cond_dim": 32, "project_cond_tokens": True}
    diffusion = {"type": "dit", "cross_attention_cond_ids": ["seconds"], "global_cond_ids": ["seconds"],
                 "config": dit}
    if backbone == "adp_cfg_1d":
        diffusion = {"type": "adp_cfg_1d", "cross_attention_cond_ids": ["seconds"],
                     "config": {"in_channels": C, "context_embedding_features": 32, "context_embedding_max_length": 1,
                                "channels": 8, "multipliers": [1, 2], "factors": [2], "num_blocks": [1],
                                "attentions": [0, 0], "use_context_time": True}}
    return {"model_type": "diffusion_cond", "sample_size": 64, "sample_rate": 16000,
            "model": {"io_channels": C, "diffusion": diffusion, "cantus": {"compile": compile_blocks},
                      "conditioning": {"cond_dim": 32, "configs": [
                          {"id": "seconds", "type": "number", "config": {"min_val": 0, "max_val": 512}}]}}}


def build(compile_blocks: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model_from_config(tiny_config(compile_blocks))
    with torch.no_grad():  # non-zero residual branches, so every block matters
        for p in model.parameters():
            if p.dim() >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model


def inputs(model):
    cond = model.conditioner([{"seconds": 10.0}, {"seconds": 200.0}], "cpu")
    x = torch.randn(B, C, T, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([0.3, 0.8]), cond


@pytest.fixture(scope="module")
def models():
    return build(False), build(True)


def test_compiled_blocks_keep_the_state_dict_and_parameter_names(models):
    eager, compiled = models
    assert len(transformer_blocks(compiled)) == 2
    assert all(b._compiled_call_impl is not None for b in transformer_blocks(compiled))
    assert all(b._compiled_call_impl is None for b in transformer_blocks(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(), eager.state_dict().values()))


def test_a_compiled_training_step_matches_eager_with_checkpointing(models):
    """Forward and backward through checkpointed compiled blocks: loss and gradients within 1e-5 of eager."""
    results = []
    for model in models:
        model.train().zero_grad(set_to_none=True)
        x, t, cond = inputs(model)
        torch.manual_seed(3)  # the same CFG dropout draws
        out = model(x, t, cond, cfg_dropout_prob=0.5)
        loss = (out - x).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.model.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=0)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_compiled_cfg_3_call_matches_eager_within_1e_5(models):
    outs = []
    for model in models:
        model.eval()
        x, t, cond = inputs(model)
        with torch.no_grad():
            outs.append(model(x, t, cond, cfg_scale=3.0, cfg_interval=(0.1, 0.9)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_a_compiled_cfg_3_sampling_run_matches_eager_within_1e_5(models):
    from pipeline.generate import generate

    latents = [generate(model, [{"seconds": 10.0}, {"seconds": 200.0}], [0, 1], steps=3, length=T, cfg_scale=3.0,
                        cfg_interval=(0.1, 0.9), decode=False).latents for model in models]
    torch.testing.assert_close(latents[1], latents[0], atol=1e-5, rtol=0)


def _explain(fn, *args, **kwargs):
    torch._dynamo.reset()  # (the compiled fixture models above recompile if used after this)
    return torch._dynamo.explain(fn)(*args, **kwargs)


def test_the_dit_training_forward_has_no_graph_break():
    model = build(False).train()
    x, t, cond = inputs(model)
    ins = model.get_conditioning_inputs(cond)
    explanation = _explain(model.model, x, t, **ins, cfg_dropout_prob=0.1)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_a_cfg_3_call_with_a_cfg_interval_has_no_graph_break():
    """SAT decides the CFG interval with a Python `if` on a tensor (a host sync, and a graph break); ours selects
    on the device."""
    model = build(False).eval()
    x, t, cond = inputs(model)
    ins = model.get_conditioning_inputs(cond)
    with torch.no_grad():
        explanation = _explain(model.model, x, t, **ins, cfg_scale=3.0, cfg_interval=(0.1, 0.9))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_on_a_backbone_without_transformer_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.cantus.compile=true: the model has no continuous_transformer"):
        create_model_from_config(tiny_config(True, backbone="adp_cfg_1d"))
