"""Independent PyTorch implementation of the mixture block of method.md sections 3-5 (BTX and
BAM), written from the specification and include/bam/mixture.h only (not from the C sources).

    x0 = wte[tokens]
    for each layer l:
        h = LayerNorm_l(x)
        BTX:            x = x + Attn_l(h)                    + MoE_l(h)
        BAM:            x = x + sum_j g_j(h) MHA_{j,l}(h)    + MoE_l(h)     g = softmax(Wa_l h)
        BAM shared KV:  as BAM, every MHA_{j,l} uses the one shared Wk_l, Wv_l
    logits = LayerNorm_f(x) @ W_head.T                       (W_head = wte when tied)

    MoE_l(h) = sum_{i in TopK(p)} gate_i FFN_{i,l}(h),       p = softmax(Wr_l h) over all Ef
        gate_i = p_i                       (BAM: no renormalisation)
        gate_i = p_i / sum_{j in TopK} p_j (ffn_renormalize, BTX's original)
    Attention top-k (att_top_k = k > 0): g_j kept for the top k of g only, NOT renormalised.
    Top-k ties go to the lower expert index (a stable sort by (-p, index)).

    Capacity (capacity_factor c > 0): each expert takes at most C = ceil(c * T * k / Ef) of a
    sequence's T*k top-k assignments, in token order (token t's assignments before token
    t+1's; a token's k assignments go to k different experts, so their order within the token
    does not matter); later assignments are dropped: that expert's term is left out of the
    token's MoE sum (the other gates are not re-normalised again).

    Loss = mean token cross-entropy (targets != -1) + sum_l ( alpha L_lb,l + beta L_z,l )
        L_lb = Ef sum_i f_i P_i,  f_i = (top-k assignments to i) / (tokens * k) (a constant),
               P_i = mean over tokens of p_i; per sequence then averaged over the sequences
               (lb_per_sequence) or over the whole batch. Every token of the batch counts
               (also those whose target is ignored: routing does not see targets).
               With a capacity, f_i counts the KEPT assignments (still divided by
               tokens * k), as mixture.h specifies (F_COUNTS_DROPPED = False).
        L_z  = mean over all B*T tokens of (logsumexp_i (Wr h)_i)^2 (FFN router only; the
               attention router has no auxiliary loss).

Parameter names and shapes are those of the C tensor table (include/bam/mixture.h), expert
tensors EXPERT-MAJOR:
    wte (V,d)  ln (L,d)  ln_f (d)  w_head (V,d) unless tied
    BTX:            wq (L,d,d) wk (L,kvd,d) wv (L,kvd,d) wo (L,d,d)
    BAM:            att_router (L,Ea,d)  wq (Ea,L,d,d) wk (Ea,L,kvd,d) wv (Ea,L,kvd,d) wo (Ea,L,d,d)
    BAM shared KV:  att_router (L,Ea,d)  wq (Ea,L,d,d) wk (L,kvd,d) wv (L,kvd,d) wo (Ea,L,d,d)
    FFN:            ffn_router (L,Ef,d)  w_gate (Ef,L,f,d) w_up (Ef,L,f,d) w_down (Ef,L,d,f)
Routers and norms are not weight-decayed; every other tensor is.

The dense pieces (LayerNorm, RoPE rotate-half, causal GQA attention, SwiGLU) are those of
torch_model.py, which test_torch_selfcheck.py checks against a literal reading of section 2.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import torch_model as tm

METHODS = ("btx", "bam", "bam-shared-kv")  # index = enum bam_method
NO_DECAY = ("ln", "ln_f", "att_router", "ffn_router")
ROUTERS = ("att_router", "ffn_router")
F_COUNTS_DROPPED = False  # mixture.h: f_i counts the kept assignments (after capacity)


@dataclass
class MixShape:
    base: tm.Shape
    method: str = "btx"        # "btx", "bam", "bam-shared-kv"
    n_att_experts: int = 1     # Ea (BAM)
    n_ffn_experts: int = 1     # Ef
    ffn_top_k: int = 1
    ffn_renormalize: bool = False
    att_top_k: int = 0         # 0: soft over all Ea
    lb_coef: float = 0.01
    z_coef: float = 0.001
    lb_per_sequence: bool = True
    capacity_factor: float = 0.0

    @property
    def is_bam(self):
        return self.method != "btx"

    @property
    def shared_kv(self):
        return self.method == "bam-shared-kv"


def param_shapes(s: MixShape):
    b = s.base
    L, d, f, V, kvd = b.n_layers, b.d_model, b.d_ff, b.vocab_size, b.kv_dim
    Ea, Ef = s.n_att_experts, s.n_ffn_experts
    shapes = {"wte": (V, d), "ln": (L, d), "ln_f": (d,)}
    if not b.tie_embeddings:
        shapes["w_head"] = (V, d)
    if s.method == "btx":
        shapes.update(wq=(L, d, d), wk=(L, kvd, d), wv=(L, kvd, d), wo=(L, d, d))
    elif s.method == "bam":
        shapes.update(att_router=(L, Ea, d), wq=(Ea, L, d, d), wk=(Ea, L, kvd, d),
                      wv=(Ea, L, kvd, d), wo=(Ea, L, d, d))
    elif s.method == "bam-shared-kv":
        shapes.update(att_router=(L, Ea, d), wq=(Ea, L, d, d), wk=(L, kvd, d),
                      wv=(L, kvd, d), wo=(Ea, L, d, d))
    else:
        raise ValueError(s.method)
    shapes.update(ffn_router=(L, Ef, d), w_gate=(Ef, L, f, d), w_up=(Ef, L, f, d),
                  w_down=(Ef, L, d, f))
    return shapes


def init_params(s: MixShape, generator: torch.Generator, std=0.1, router_std=0.5):
    """float32 parameters: matrices ~ N(0, std^2); norm scales 1 + std N(0,1); routers
    ~ N(0, router_std^2) (large, so the routing is decisive)."""
    params = {}
    for name, shp in param_shapes(s).items():
        r = torch.randn(shp, generator=generator, dtype=torch.float32)
        if name in ("ln", "ln_f"):
            params[name] = 1.0 + std * r
        elif name in ROUTERS:
            params[name] = router_std * r
        else:
            params[name] = std * r
    return params


def stable_topk_mask(p, k):
    """0/1 mask (same shape as p) of the k largest entries along the last dimension, ties to
    the lower index: a stable sort of -p keeps equal values in index order."""
    order = torch.sort(-p, dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(p).scatter_(-1, order, 1.0)


def topk_margin(z, k):
    """Per row: z_(k) - z_(k+1) of the descending order (the gap that decides the top-k set);
    +inf when k covers every expert."""
    if k >= z.shape[-1]:
        return torch.full(z.shape[:-1], math.inf, dtype=z.dtype)
    zs = torch.sort(z, dim=-1, descending=True).values
    return zs[..., k - 1] - zs[..., k]


def capacity(s: MixShape, T):
    """Per expert, per sequence: ceil(c * T * k / Ef), or None when dropless."""
    if s.capacity_factor <= 0:
        return None
    return int(math.ceil(s.capacity_factor * T * s.ffn_top_k / s.n_ffn_experts))


def mha(h, wq, wo, k, v, b: tm.Shape, cos, sin):
    """Causal (GQA) attention of one expert given its projected k, v (B, Hkv, T, hd) with RoPE
    already applied to k; the same computation as tm.attention."""
    B, T, d = h.shape
    H, Hkv, hd = b.n_heads, b.n_kv_heads, b.head_dim
    q = tm.apply_rope((h @ wq.t()).view(B, T, H, hd).transpose(1, 2), cos, sin)
    group = H // Hkv
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, d)
    return y @ wo.t()


def kv_proj(h, wk, wv, b: tm.Shape, cos, sin):
    B, T, _ = h.shape
    k = (h @ wk.t()).view(B, T, b.n_kv_heads, b.head_dim).transpose(1, 2)
    v = (h @ wv.t()).view(B, T, b.n_kv_heads, b.head_dim).transpose(1, 2)
    return tm.apply_rope(k, cos, sin), v


def forward(params, tokens, s: MixShape, targets=None, fixed_routing=None):
    """tokens, targets (B, T) int64. Returns a dict with
        logits (B,T,V); and with targets: loss (token loss + aux), token_loss, aux_loss,
        token_losses (B*T, 0 where ignored);
        per layer (lists of length L): lb, z (the unscaled L_lb, L_z), ffn_sel, ffn_keep
        (B,T,Ef 0/1: top-k choice, and what survives capacity), att_mask (B,T,Ea or None),
        ffn_p (B,T,Ef), att_g (B,T,Ea or None), ffn_margin, att_margin (B,T logit gaps).
    fixed_routing: a previous result's dict: reuse its ffn_sel / att_mask instead of choosing
    (for finite-difference checks of a fixed routing)."""
    b = s.base
    B, T = tokens.shape
    L, Ea, Ef, k = b.n_layers, s.n_att_experts, s.n_ffn_experts, s.ffn_top_k
    dtype = params["wte"].dtype
    cos, sin = tm.rope_tables(T, b.head_dim, b.rope_base, dtype)
    cap = capacity(s, T)
    out = {key: [] for key in ("lb", "z", "ffn_sel", "ffn_keep", "att_mask", "ffn_p", "att_g",
                               "ffn_margin", "att_margin")}
    x = F.embedding(tokens, params["wte"])
    aux = x.new_zeros(())
    for l in range(L):
        h = tm.layer_norm(x, params["ln"][l], b.norm_eps)

        # ---- attention: dense (BTX) or the soft / top-k mixture of experts (BAM) ----
        if not s.is_bam:
            a = tm.attention(h, params["wq"][l], params["wk"][l], params["wv"][l],
                             params["wo"][l], b, cos, sin)
            out["att_mask"].append(None)
            out["att_g"].append(None)
            out["att_margin"].append(None)
        else:
            za = h @ params["att_router"][l].t()                 # (B, T, Ea)
            g = torch.softmax(za, dim=-1)
            out["att_g"].append(g)
            if s.att_top_k > 0:
                if fixed_routing is not None:
                    amask = fixed_routing["att_mask"][l]
                else:
                    amask = stable_topk_mask(g.detach(), s.att_top_k)
                gate = g * amask                                  # not renormalised
                out["att_margin"].append(topk_margin(za.detach(), s.att_top_k))
            else:
                amask = None
                gate = g
                out["att_margin"].append(None)
            out["att_mask"].append(amask)
            if s.shared_kv:
                kk, vv = kv_proj(h, params["wk"][l], params["wv"][l], b, cos, sin)
            a = 0
            for j in range(Ea):
                if not s.shared_kv:
                    kk, vv = kv_proj(h, params["wk"][j, l], params["wv"][j, l], b, cos, sin)
                a = a + gate[..., j:j + 1] * mha(h, params["wq"][j, l], params["wo"][j, l],
                                                 kk, vv, b, cos, sin)

        # ---- FFN mixture: softmax router over all Ef, top-k, optional renormalisation ----
        zr = h @ params["ffn_router"][l].t()                      # (B, T, Ef)
        p = torch.softmax(zr, dim=-1)
        if fixed_routing is not None:
            sel = fixed_routing["ffn_sel"][l]
        else:
            sel = stable_topk_mask(p.detach(), k)
        if cap is None:
            keep = sel
        else:  # assignment (b, t, i) survives when it is among the first C to expert i in b
            keep = sel * (torch.cumsum(sel, dim=1) <= cap).to(dtype)
        gate = p * sel
        if s.ffn_renormalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        gate = gate * keep
        m = 0
        for i in range(Ef):
            m = m + gate[..., i:i + 1] * tm.ffn(h, params["w_gate"][i, l], params["w_up"][i, l],
                                                params["w_down"][i, l])
        x = x + a + m

        # ---- auxiliary losses (f from the top-k choice: a constant) ----
        f_counts = sel if F_COUNTS_DROPPED else keep
        if s.lb_per_sequence:
            f_i = f_counts.sum(dim=1) / (T * k)                   # (B, Ef)
            P_i = p.mean(dim=1)
            lb = (Ef * (f_i * P_i).sum(dim=-1)).mean()
        else:
            f_i = f_counts.sum(dim=(0, 1)) / (B * T * k)          # (Ef)
            P_i = p.mean(dim=(0, 1))
            lb = Ef * (f_i * P_i).sum()
        z = (torch.logsumexp(zr, dim=-1) ** 2).mean()
        aux = aux + s.lb_coef * lb + s.z_coef * z
        out["lb"].append(lb)
        out["z"].append(z)
        out["ffn_sel"].append(sel)
        out["ffn_keep"].append(keep)
        out["ffn_p"].append(p)
        out["ffn_margin"].append(topk_margin(zr.detach(), k))

    x = tm.layer_norm(x, params["ln_f"], b.norm_eps)
    head = params["wte"] if b.tie_embeddings else params["w_head"]
    logits = x @ head.t()
    out["logits"] = logits
    out["aux_loss"] = aux
    if targets is not None:
        fl, ft = logits.reshape(B * T, -1), targets.reshape(B * T)
        out["token_loss"] = F.cross_entropy(fl, ft, ignore_index=-1)
        out["token_losses"] = F.cross_entropy(fl, ft, ignore_index=-1, reduction="none")
        out["loss"] = out["token_loss"] + aux
    return out


def route_stats(out, s: MixShape):
    """The quantities of bam_route_stats for a forward's result (float64 lists per layer):
    ffn_share (share of the top-k assignments, before capacity dropping), ffn_share_kept (the
    same after dropping, divided by the same B*T*k), att_gate (mean gate as used: soft g, or
    with att_top_k the kept entries only), ffn_entropy, att_entropy (mean entropy of p and of
    the unmasked g = softmax(h Wa^T), nats), n_dropped."""
    st = {"ffn_share": [], "ffn_share_kept": [], "att_gate": [], "ffn_entropy": [],
          "att_entropy": [], "n_dropped": []}
    for l in range(len(out["ffn_p"])):
        sel, keep, p = out["ffn_sel"][l], out["ffn_keep"][l], out["ffn_p"][l].detach()
        n = sel.shape[0] * sel.shape[1] * s.ffn_top_k
        st["ffn_share"].append((sel.sum(dim=(0, 1)) / n).tolist())
        st["ffn_share_kept"].append((keep.sum(dim=(0, 1)) / n).tolist())
        st["n_dropped"].append(int((sel - keep).sum().item()))
        st["ffn_entropy"].append(float(-(p * torch.log(p)).sum(-1).mean()))
        g = out["att_g"][l]
        if g is not None:
            g = g.detach()
            used = g if out["att_mask"][l] is None else g * out["att_mask"][l]
            st["att_gate"].append(used.mean(dim=(0, 1)).tolist())
            st["att_entropy"].append(float(-(g * torch.log(g)).sum(-1).mean()))
    return st


def min_margin(out):
    """Smallest logit gap deciding any top-k set of this forward (inf if none is decided)."""
    mm = math.inf
    for key in ("ffn_margin", "att_margin"):
        for t in out[key]:
            if t is not None:
                mm = min(mm, float(t.min()))
    return mm
