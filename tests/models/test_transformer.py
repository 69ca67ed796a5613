"""Continuous transformer: rotary, grouped cross-attention, masks and checkpointing against references."""

import math

import pytest
import torch

from pipeline.models.transformer import Attention, ContinuousTransformer, RotaryEmbedding, apply_rotary


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
