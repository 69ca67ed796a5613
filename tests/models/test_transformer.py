"""Continuous transformer: rotary, grouped cross-attention, masks and checkpointing against references."""

import math

import pytest
import torch

from pipeline.models.transformer import Attention, ContinuousTransformer, LayerNorm, RotaryEmbedding, apply_rotary


def _rotary_reference(t, rot_dim, base=10000.0):
    """Float64 rotary from the definition: channel pairs (i, i + rot_dim/2) rotated by pos * base^(-2i/rot_dim)."""
    t = t.double()
    n, half = t.shape[-2], rot_dim // 2
    out = t.clone()
    for pos in range(n):
        for i in range(half):
            theta = pos * base ** (-2 * i / rot_dim)
            a, b = t[..., pos, i], t[..., pos, i + half]
            out[..., pos, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., pos, i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def test_partial_rotary_matches_float64_definition_and_leaves_other_channels():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 7, 64)  # head size 64 -> 32 rotated channels, as SAT
    rope = RotaryEmbedding(32)
    out = apply_rotary(q, rope.forward_from_seq_len(7))
    ref = _rotary_reference(q[..., :32], 32)
    assert (out[..., :32].double() - ref).abs().max() < 1e-5
    assert torch.equal(out[..., 32:], q[..., 32:])


def test_cross_attention_with_fewer_kv_heads_matches_float64_reference():
    torch.manual_seed(0)
    attn = Attention(dim=128, dim_heads=32, dim_context=64, zero_init_output=False)  # 4 query, 2 kv heads
    x, ctx = torch.randn(2, 5, 128), torch.randn(2, 6, 64)
    out = attn(x, context=ctx)
    q = (x.double() @ attn.to_q.weight.double().T).view(2, 5, 4, 32).transpose(1, 2)
    k, v = (ctx.double() @ attn.to_kv.weight.double().T).chunk(2, dim=-1)
    k, v = (z.view(2, 6, 2, 32).transpose(1, 2) for z in (k, v))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query head h uses kv head h // 2
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    ref = (w @ v).transpose(1, 2).reshape(2, 5, 128) @ attn.to_out.weight.double().T
    assert (out.double() - ref).abs().max() < 1e-5


def test_attention_with_too_narrow_context_names_the_problem():
    with pytest.raises(ValueError, match="key/value heads"):
        Attention(dim=128, dim_heads=64, dim_context=32)


def _tiny(**kw):
    torch.manual_seed(0)
    model = ContinuousTransformer(dim=64, depth=2, dim_in=4, dim_out=4, dim_heads=32, cross_attend=True,
                                  cond_token_dim=64, zero_init_branch_outputs=False, **kw)
    return model


def test_key_mask_makes_padded_tokens_invisible_to_real_ones():
    model = _tiny().eval()
    x, ctx = torch.randn(1, 6, 4), torch.randn(1, 3, 64)
    mask = torch.tensor([[True, True, True, True, False, False]])
    changed = x.clone()
    changed[:, 4:] = 100.0
    a = model(x, context=ctx, key_mask=mask)
    b = model(changed, context=ctx, key_mask=mask)
    assert (a[:, :4] - b[:, :4]).abs().max() < 1e-5
    c = model(changed, context=ctx)  # without the mask the padding leaks in
    assert (a[:, :4] - c[:, :4]).abs().max() > 1e-3


def test_checkpointed_blocks_give_the_same_gradients():
    x, ctx = torch.randn(2, 5, 4), torch.randn(2, 3, 64)
    grads = []
    for blocks in (0, 1, 2):
        model = _tiny(checkpointed_blocks=blocks).train()
        model(x, context=ctx).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_memory_tokens_are_dropped_from_the_output():
    model = _tiny(num_memory_tokens=3)
    assert model(torch.randn(2, 5, 4), context=torch.randn(2, 3, 64)).shape == (2, 5, 4)


def _layer_norm_reference(x, gamma):
    """fp64 LayerNorm over the last dim, eps 1e-5, zero bias."""
    x = x.double()
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * gamma.double()


def test_layer_norm_with_a_bf16_gamma_and_an_fp32_beta_buffer_runs_in_fp32():
    """DeepSpeed's bf16 casts parameters, not buffers: gamma bf16 beside the fp32 beta buffer must still work,
    computed in fp32 as CUDA autocast computes layer_norm (fp32 out under autocast, x's dtype without)."""
    norm = LayerNorm(16)
    with torch.no_grad():
        norm.gamma.copy_(torch.linspace(0.5, 2.0, 16))
    norm.gamma.data = norm.gamma.data.bfloat16()
    assert norm.beta.dtype == torch.float32
    x = torch.randn(2, 5, 16).bfloat16()
    expected = _layer_norm_reference(x, norm.gamma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    plain = norm(x)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain, expected.bfloat16())


def test_layer_norm_in_fp32_is_the_plain_call():
    norm = LayerNorm(8, bias=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (8,), norm.gamma, norm.beta, 1e-5),
                               rtol=0, atol=0)
