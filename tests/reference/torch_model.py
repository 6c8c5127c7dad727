"""Independent PyTorch implementation of the dense block of method.md section 2.

Written from the specification only (not from the C sources), with plain
torch.nn.functional operations so every step is visible:

    x0 = wte[tokens]
    for each layer l:  h = LayerNorm_l(x);  x = x + Attn_l(h) + FFN_l(h)
    logits = LayerNorm_f(x) @ W_head.T            (W_head = wte when tied)

LayerNorm: learned scale, NO bias, eps 1e-5.  Attn: causal, scores / sqrt(head_dim), RoPE
(base 10000, rotate-half: dimension i of a head pairs with i + head_dim/2, angle =
pos * base^(-2i/head_dim)) on q and k, optional grouped-query attention (query head h reads
kv head h // (n_heads / n_kv_heads)).  FFN: SwiGLU  W_down(silu(W_gate h) * (W_up h)).
No biases anywhere.  Linear layers are y = x @ W.T.

Parameter names and shapes are those of the C tensor table (include/bam/model.h):
    wte (V,d)  ln (L,d)  wq (L,d,d)  wk (L,kvd,d)  wv (L,kvd,d)  wo (L,d,d)
    w_gate (L,f,d)  w_up (L,f,d)  w_down (L,d,f)  ln_f (d)  w_head (V,d) [untied only]
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Order of the C tensor table; w_head is absent when the embeddings are tied.
TENSOR_NAMES = ["wte", "ln", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "ln_f", "w_head"]
NORM_NAMES = ("ln", "ln_f")  # no weight decay


@dataclass
class Shape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim


def param_shapes(s: Shape):
    L, d, f, V, kvd = s.n_layers, s.d_model, s.d_ff, s.vocab_size, s.kv_dim
    shapes = {
        "wte": (V, d),
        "ln": (L, d),
        "wq": (L, d, d),
        "wk": (L, kvd, d),
        "wv": (L, kvd, d),
        "wo": (L, d, d),
        "w_gate": (L, f, d),
        "w_up": (L, f, d),
        "w_down": (L, d, f),
        "ln_f": (d,),
    }
    if not s.tie_embeddings:
        shapes["w_head"] = (V, d)
    return shapes


def init_params(s: Shape, generator: torch.Generator, std=0.1):
    """Random float32 parameters: matrices ~ N(0, std^2); norm scales 1 + std*N(0,1) so the
    scale gradients are not those of an identity scale."""
    params = {}
    for name, shp in param_shapes(s).items():
        r = torch.randn(shp, generator=generator, dtype=torch.float32)
        params[name] = (1.0 + std * r) if name in NORM_NAMES else std * r
    return params


def rope_tables(T, head_dim, base, dtype):
    """cos, sin of shape (T, head_dim/2): angle[p, i] = p * base^(-2i/head_dim)."""
    half = head_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    inv_freq = base ** (-2.0 * i / head_dim)
    pos = torch.arange(T, dtype=torch.float64)
    ang = pos[:, None] * inv_freq[None, :]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, heads, T, hd). Rotate-half: pair (x[i], x[i+hd/2]) rotated by angle[p, i]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def layer_norm(x, scale, eps):
    return F.layer_norm(x, (x.shape[-1],), weight=scale, bias=None, eps=eps)


def attention(h, wq, wk, wv, wo, s: Shape, cos, sin):
    B, T, d = h.shape
    H, Hkv, hd = s.n_heads, s.n_kv_heads, s.head_dim
    q = (h @ wq.t()).view(B, T, H, hd).transpose(1, 2)    # (B, H, T, hd)
    k = (h @ wk.t()).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    v = (h @ wv.t()).view(B, T, Hkv, hd).transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    group = H // Hkv
    if group > 1:  # query head hh uses kv head hh // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)     # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    att = torch.softmax(scores, dim=-1)
    y = att @ v                                             # (B, H, T, hd)
    y = y.transpose(1, 2).reshape(B, T, d)
    return y @ wo.t()


def ffn(h, w_gate, w_up, w_down):
    return (F.silu(h @ w_gate.t()) * (h @ w_up.t())) @ w_down.t()


def forward(params, tokens, s: Shape, targets=None):
    """tokens, targets: (B, T) int64.  Returns logits (B, T, V) and, with targets, the mean
    cross-entropy over targets != -1 and the per-token losses (0 where ignored)."""
    B, T = tokens.shape
    dtype = params["wte"].dtype
    cos, sin = rope_tables(T, s.head_dim, s.rope_base, dtype)
    x = F.embedding(tokens, params["wte"])
    for l in range(s.n_layers):
        h = layer_norm(x, params["ln"][l], s.norm_eps)
        a = attention(h, params["wq"][l], params["wk"][l], params["wv"][l], params["wo"][l], s,
                      cos, sin)
        m = ffn(h, params["w_gate"][l], params["w_up"][l], params["w_down"][l])
        x = x + a + m
    x = layer_norm(x, params["ln_f"], s.norm_eps)
    head = params["wte"] if s.tie_embeddings else params["w_head"]
    logits = x @ head.t()
    if targets is None:
        return logits, None, None
    flat_logits = logits.reshape(B * T, -1)
    flat_targets = targets.reshape(B * T)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1)
    token_losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="none")
    return logits, loss, token_losses
