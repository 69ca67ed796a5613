"""Continuous transformer: the DiT's block stack, with SAT's parameter names.

Pre-norm blocks (bias-less LayerNorm), fused QKV self-attention with partial rotary embeddings,
cross-attention whose key/value width is the context width (SAO: 24 query heads over 12 key/value
heads), SwiGLU feed-forward, zero-initialised residual branches and optional adaLN modulation.
State-dict names equal stable-audio-tools' `models/transformer.py`, so SAT checkpoints load strict.

Masks (`key_mask`, `context_mask`: bool, True = attend) are honoured only when the caller passes
them; the DiT passes them only when `model.cantus.attention_masks` is true, because SAT ignores both.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

try:  # flash-attn is optional; SDPA is the portable path.
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
QK_NORMS = ("none", "l2", "ln")


class LayerNorm(nn.Module):
    """LayerNorm with a learned `gamma` and, by default, a fixed zero `beta` buffer (SAT's names)."""

    def __init__(self, dim: int, bias: bool = False, fix_scale: bool = False, force_fp32: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        if fix_scale:
            self.register_buffer("gamma", torch.ones(dim))
        else:
            self.gamma = nn.Parameter(torch.ones(dim))
        if bias:
            self.beta = nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("beta", torch.zeros(dim))
        self.eps = eps
        self.force_fp32 = force_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        if not (self.force_fp32 or autocast) and x.dtype == self.gamma.dtype == self.beta.dtype:
            return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, self.eps)
        # In fp32 with gamma and beta cast to fp32, as CUDA autocast runs layer_norm (SAT's numerics on a GPU).
        # CPU autocast does not upcast, and DeepSpeed's bf16 casts the parameter gamma but not the buffer beta:
        # mixed dtypes would fail there.
        out = F.layer_norm(x.float(), x.shape[-1:], self.gamma.float(), self.beta.float(), self.eps)
        # Autocast's layer_norm returns fp32; force_fp32 (SAT) and a plain low-precision call keep x's dtype.
        return out if autocast and not self.force_fp32 else out.to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_val: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.full([dim], init_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class RotaryEmbedding(nn.Module):
    """Rotary frequencies for the first `dim` channels of each head (partial rotary, GPT-J)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: SAT's checkpoints carry it

    def forward_from_seq_len(self, seq_len: int) -> torch.Tensor:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())  # (n, dim/2)
        return torch.cat((freqs, freqs), dim=-1)  # (n, dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first freqs.shape[-1] channels of t (..., n, d) in float32; the rest pass through."""
    rot_dim = freqs.shape[-1]
    freqs = freqs[-t.shape[-2]:].float()
    rotated, rest = t[..., :rot_dim].float(), t[..., rot_dim:]
    rotated = rotated * freqs.cos() + rotate_half(rotated) * freqs.sin()
    return torch.cat((rotated.to(t.dtype), rest), dim=-1)


class GLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, activation: nn.Module):
        super().__init__()
        self.act = activation
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * self.act(gate)


class FeedForward(nn.Module):
    """SwiGLU (default) or SiLU MLP; `ff.0` in, `ff.2` out, as SAT names them."""

    def __init__(self, dim: int, mult: float = 4, no_bias: bool = False, glu: bool = True,
                 zero_init_output: bool = True):
        super().__init__()
        inner_dim = int(dim * mult)
        if glu:
            linear_in = GLU(dim, inner_dim, nn.SiLU())
        else:
            linear_in = nn.Sequential(nn.Identity(), nn.Linear(dim, inner_dim, bias=not no_bias),
                                      nn.Identity(), nn.SiLU())
        linear_out = nn.Linear(inner_dim, dim, bias=not no_bias)
        if zero_init_output:  # each block starts as the identity
            nn.init.zeros_(linear_out.weight)
            if not no_bias:
                nn.init.zeros_(linear_out.bias)
        self.ff = nn.Sequential(linear_in, nn.Identity(), linear_out, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class Attention(nn.Module):
    """Multi-head attention; with `dim_context` it is cross-attention with dim_context // dim_heads
    key/value heads, repeated to the query heads (grouped-query attention)."""

    def __init__(self, dim: int, dim_heads: int = 64, dim_context: int | None = None,
                 zero_init_output: bool = True, qk_norm: str = "none", backend: str = "auto"):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"attn_kwargs.qk_norm={qk_norm!r} is not supported; expected one of {QK_NORMS}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={backend!r}; expected one of {ATTENTION_BACKENDS}")
        if backend == "flash" and flash_attn_func is None:
            raise ImportError("attention_backend='flash' needs the flash-attn package (pip install flash-attn)")
        dim_kv = dim if dim_context is None else dim_context
        self.num_heads = dim // dim_heads
        self.kv_heads = dim_kv // dim_heads
        if self.kv_heads == 0 or self.num_heads % self.kv_heads != 0:
            raise ValueError(f"attention with {self.num_heads} query heads of size {dim_heads} cannot use "
                             f"{dim_kv} // {dim_heads} = {self.kv_heads} key/value heads (context width "
                             f"{dim_kv}); make the context width a multiple of the head size")
        if dim_context is None:
            self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(dim_kv, dim_kv * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        if zero_init_output:
            nn.init.zeros_(self.to_out.weight)
        self.qk_norm = qk_norm
        if qk_norm == "ln":
            self.q_norm = nn.LayerNorm(dim_heads, eps=1e-6)
            self.k_norm = nn.LayerNorm(dim_heads, eps=1e-6)
        self.backend = backend

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rotary_freqs: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = self.to_kv(context).chunk(2, dim=-1)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.kv_heads) for t in (k, v))

        if self.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        elif self.qk_norm == "ln":
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)

        if rotary_freqs is not None:  # self-attention only: q and k share positions
            q, k = apply_rotary(q, rotary_freqs), apply_rotary(k, rotary_freqs)

        out = self._attend(q, k, v, key_mask)  # (b, h, n, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _use_flash(self, q: torch.Tensor, key_mask: torch.Tensor | None) -> bool:
        # flash-attn takes no key mask and only half precision; SAT casts fp32 to fp16 for it, we
        # keep fp32 on SDPA instead so an fp32 run stays fp32.
        if flash_attn_func is None or self.backend == "sdpa" or key_mask is not None:
            return False
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

    def _attend(self, q, k, v, key_mask):
        if self._use_flash(q, key_mask):
            q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
            return rearrange(flash_attn_func(q, k, v), "b n h d -> b h n d")  # native GQA grouping
        if self.kv_heads != self.num_heads:  # same grouping as SAT: query head i uses kv head i // g
            group = self.num_heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn_mask = None
        if key_mask is not None:
            # A row with no valid key would give NaN; let it attend to everything instead (the
            # masked tokens are zeros or padding, so this equals attending to a null context).
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
            attn_mask = key_mask[:, None, None, :]  # (b, 1, 1, s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, dim_heads: int = 64, cross_attend: bool = False,
                 dim_context: int | None = None, global_cond_dim: int | None = None,
                 zero_init_branch_outputs: bool = True, layer_scale: bool = False,
                 attn_kwargs: dict | None = None, ff_kwargs: dict | None = None,
                 norm_kwargs: dict | None = None, attention_backend: str = "auto"):
        super().__init__()
        attn_kwargs, ff_kwargs, norm_kwargs = attn_kwargs or {}, ff_kwargs or {}, norm_kwargs or {}
        dim_heads = min(dim_heads, dim)
        if layer_scale:  # LayerScale starts near zero, which already makes the block an identity
            zero_init_branch_outputs = False
        self.pre_norm = LayerNorm(dim, **norm_kwargs)
        self.self_attn = Attention(dim, dim_heads, zero_init_output=zero_init_branch_outputs,
                                   backend=attention_backend, **attn_kwargs)
        self.self_attn_scale = LayerScale(dim) if layer_scale else nn.Identity()
        self.cross_attend = cross_attend
        if cross_attend:
            self.cross_attend_norm = LayerNorm(dim, **norm_kwargs)
            self.cross_attn = Attention(dim, dim_heads, dim_context=dim_context,
                                        zero_init_output=zero_init_branch_outputs,
                                        backend=attention_backend, **attn_kwargs)
            self.cross_attn_scale = LayerScale(dim) if layer_scale else nn.Identity()
        self.ff_norm = LayerNorm(dim, **norm_kwargs)
        self.ff = FeedForward(dim, zero_init_output=zero_init_branch_outputs, **ff_kwargs)
        self.ff_scale = LayerScale(dim) if layer_scale else nn.Identity()
        self.global_cond_dim = global_cond_dim
        if global_cond_dim is not None:
            self.to_scale_shift_gate = nn.Parameter(torch.randn(6 * dim) / dim ** 0.5)

    def forward(self, x, context=None, global_cond=None, rotary_freqs=None, key_mask=None,
                context_mask=None):
        """x (B, N, D); context (B, S, Dc); global_cond (B, 6D) from the shared adaLN embedder."""
        if self.global_cond_dim is not None and global_cond is not None:
            scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = (
                (self.to_scale_shift_gate + global_cond).unsqueeze(1).chunk(6, dim=-1))
            h = self.pre_norm(x) * (1 + scale_sa) + shift_sa
            h = self.self_attn(h, rotary_freqs=rotary_freqs, key_mask=key_mask)
            x = x + self.self_attn_scale(h * torch.sigmoid(1 - gate_sa))  # SAT's gate: sigmoid(1 - g)
            x = self._cross(x, context, context_mask)
            h = self.ff(self.ff_norm(x) * (1 + scale_ff) + shift_ff)
            return x + self.ff_scale(h * torch.sigmoid(1 - gate_ff))
        x = x + self.self_attn_scale(self.self_attn(self.pre_norm(x), rotary_freqs=rotary_freqs,
                                                    key_mask=key_mask))
        x = self._cross(x, context, context_mask)
        return x + self.ff_scale(self.ff(self.ff_norm(x)))

    def _cross(self, x, context, context_mask):
        if context is None or not self.cross_attend:
            return x
        return x + self.cross_attn_scale(self.cross_attn(self.cross_attend_norm(x), context=context,
                                                         key_mask=context_mask))


class ScaledSinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1) * dim ** -0.5)
        half = dim // 2
        self.register_buffer("inv_freq", theta ** -(torch.arange(half).float() / half), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device, dtype=self.inv_freq.dtype)
        emb = torch.outer(pos, self.inv_freq)
        return torch.cat((emb.sin(), emb.cos()), dim=-1) * self.scale


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.scale = dim ** -0.5
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds abs_pos_emb_max_length={self.max_seq_len}")
        return self.emb(torch.arange(x.shape[1], device=x.device)) * self.scale


class ContinuousTransformer(nn.Module):
    """Projection in, [memory tokens, prepended tokens, input] through `depth` blocks, projection out."""

    def __init__(self, dim: int, depth: int, *, dim_in: int | None = None, dim_out: int | None = None,
                 dim_heads: int = 64, cross_attend: bool = False, cond_token_dim: int | None = None,
                 final_cross_attn_ix: int = -1, global_cond_dim: int | None = None,
                 rotary_pos_emb: bool = True, zero_init_branch_outputs: bool = True,
                 use_sinusoidal_emb: bool = False, use_abs_pos_emb: bool = False,
                 abs_pos_emb_max_length: int = 10000, num_memory_tokens: int = 0,
                 layer_scale: bool = False, attn_kwargs: dict | None = None,
                 ff_kwargs: dict | None = None, norm_kwargs: dict | None = None,
                 checkpointed_blocks: int | None = None, attention_backend: str = "auto"):
        super().__init__()
        self.dim, self.depth = dim, depth
        self.project_in = nn.Linear(dim_in, dim, bias=False) if dim_in is not None else nn.Identity()
        self.project_out = nn.Linear(dim, dim_out, bias=False) if dim_out is not None else nn.Identity()
        # SAT rotates max(head/2, 32) channels, so heads smaller than 32 cannot use rotary.
        self.rotary_pos_emb = RotaryEmbedding(max(dim_heads // 2, 32)) if rotary_pos_emb else None
        if rotary_pos_emb and dim_heads < 32:
            raise ValueError(f"rotary embeddings need a head size >= 32 (got embed_dim/num_heads = {dim_heads})")
        self.num_memory_tokens = num_memory_tokens
        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))
        self.use_pos_emb = use_sinusoidal_emb or use_abs_pos_emb
        if use_sinusoidal_emb:
            self.pos_emb = ScaledSinusoidalEmbedding(dim)
        elif use_abs_pos_emb:
            self.pos_emb = AbsolutePositionalEmbedding(dim, abs_pos_emb_max_length + num_memory_tokens)
        self.global_cond_embedder = None
        if global_cond_dim is not None:  # adaLN: one shared MLP to 6 modulation vectors per block
            self.global_cond_embedder = nn.Sequential(
                nn.Linear(global_cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim * 6))
        self.layers = nn.ModuleList([
            TransformerBlock(
                dim, dim_heads=dim_heads,
                cross_attend=cross_attend and (final_cross_attn_ix == -1 or i <= final_cross_attn_ix),
                dim_context=cond_token_dim, global_cond_dim=global_cond_dim,
                zero_init_branch_outputs=zero_init_branch_outputs, layer_scale=layer_scale,
                attn_kwargs=attn_kwargs, ff_kwargs=ff_kwargs, norm_kwargs=norm_kwargs,
                attention_backend=attention_backend)
            for i in range(depth)])
        self.checkpointed_blocks = depth if checkpointed_blocks is None else checkpointed_blocks

    def forward(self, x: torch.Tensor, prepend_embeds: torch.Tensor | None = None,
                context: torch.Tensor | None = None, global_cond: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, prepend_mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim_in) -> (B, P + T, dim_out), P prepended tokens kept (the caller drops them).

        key_mask (B, T) / prepend_mask (B, P): True = a real token; None = all real."""
        batch = x.shape[0]
        x = self.project_in(x)  # (B, T, D)
        if prepend_embeds is not None:
            if prepend_embeds.shape[-1] != x.shape[-1]:
                raise ValueError(f"prepended tokens have width {prepend_embeds.shape[-1]}, the model {x.shape[-1]}")
            x = torch.cat((prepend_embeds, x), dim=1)  # (B, P + T, D)
        if self.num_memory_tokens > 0:
            x = torch.cat((self.memory_tokens.expand(batch, -1, -1), x), dim=1)
        if key_mask is not None or (prepend_mask is not None and prepend_embeds is not None):
            key_mask = self._full_key_mask(x, key_mask, prepend_embeds, prepend_mask)
        rotary_freqs = (self.rotary_pos_emb.forward_from_seq_len(x.shape[1])
                        if self.rotary_pos_emb is not None else None)
        if self.use_pos_emb:
            x = x + self.pos_emb(x)
        if global_cond is not None and self.global_cond_embedder is not None:
            global_cond = self.global_cond_embedder(global_cond)  # (B, 6D)

        use_ckpt = self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (x, context, global_cond, rotary_freqs, key_mask, context_mask)
            if use_ckpt and i < self.checkpointed_blocks:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        x = x[:, self.num_memory_tokens:]
        return self.project_out(x)

    def _full_key_mask(self, x, key_mask, prepend_embeds, prepend_mask):
        """(B, M + P + T) bool over memory, prepended and input tokens; missing parts are real."""
        batch, device = x.shape[0], x.device
        num_prepend = 0 if prepend_embeds is None else prepend_embeds.shape[1]
        seq = x.shape[1] - self.num_memory_tokens - num_prepend
        parts = []
        if self.num_memory_tokens > 0:
            parts.append(torch.ones(batch, self.num_memory_tokens, dtype=torch.bool, device=device))
        if prepend_embeds is not None:
            parts.append(prepend_mask.bool() if prepend_mask is not None else
                         torch.ones(batch, prepend_embeds.shape[1], dtype=torch.bool, device=device))
        parts.append(key_mask.bool() if key_mask is not None else
                     torch.ones(batch, seq, dtype=torch.bool, device=device))
        return torch.cat(parts, dim=1)
