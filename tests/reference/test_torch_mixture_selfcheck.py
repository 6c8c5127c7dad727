#!/usr/bin/env python3
"""Checks the PyTorch mixture reference itself (torch_mixture.py), so that the C comparison in
test_mixture_reference.c rests on a reference known to follow method.md sections 3-4 and
include/bam/mixture.h:

 1. a literal, loop-by-loop NumPy reading of the specification (per sequence, per token, per
    expert, per head; top-k by scanning; capacity by per-expert counters in token order;
    f_i (kept assignments), P_i, L_lb, L_z by explicit sums) gives the same logits, token
    loss, auxiliary losses and routing as the vectorised model, for BTX (top-2, renormalised,
    per-sequence L_lb),
    BAM soft (top-1), BAM shared KV (GQA, tied, batch-level L_lb) and BAM with attention
    top-2, FFN top-2 and a capacity that drops assignments, and BTX renormalised top-2 with
    a capacity (ceil of a non-integer) and batch-level L_lb;
 2. the top-k helper sends ties to the lower index; renormalised top-k gates equal
    softmax over the top-k router logits (BTX's softmax(TopK(logits)));
 3. autograd gradients of the float64 model, routing fixed, pass torch.autograd.gradcheck
    (finite differences) for every parameter, in each configuration; with the routing chosen
    inside the forward (f_i a constant) the gradients are the same.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import numpy as np
    import torch
except ImportError as e:  # pragma: no cover
    print(f"FAIL: {e} (run with the Debian /usr/bin/python3 and python3-torch)")
    sys.exit(1)

import torch_mixture as tx  # noqa: E402
import torch_model as tm  # noqa: E402

torch.set_num_threads(1)

n_pass = n_fail = 0


def check(cond, what):
    global n_pass, n_fail
    if cond:
        n_pass += 1
    else:
        n_fail += 1
        print("FAIL", what)


def naive_forward(P, tokens, targets, s: tx.MixShape):
    """Scalar loops over the specification in float64 NumPy; no torch, no masks."""
    P = {k: v.astype(np.float64) for k, v in P.items()}
    b = s.base
    B, T = tokens.shape
    d, H, Hkv, hd = b.d_model, b.n_heads, b.n_kv_heads, b.head_dim
    half, eps = hd // 2, b.norm_eps
    L, Ea, Ef, K = b.n_layers, s.n_att_experts, s.n_ffn_experts, s.ffn_top_k

    def ln(v, g):
        mu = sum(v) / len(v)
        var = sum((vi - mu) ** 2 for vi in v) / len(v)
        return np.array([(v[i] - mu) / math.sqrt(var + eps) * g[i] for i in range(len(v))])

    def rope(vec, pos):
        out = vec.copy()
        for i in range(half):
            a = pos * b.rope_base ** (-2.0 * i / hd)
            x1, x2 = vec[i], vec[i + half]
            out[i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[i + half] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    def softmax(z):
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e], m + math.log(sum(e))

    def topk(p, k):  # scan: repeatedly take the largest, first index on ties
        chosen = []
        for _ in range(k):
            best = -1
            for i in range(len(p)):
                if i not in chosen and (best < 0 or p[i] > p[best]):
                    best = i
            chosen.append(best)
        return chosen

    def silu(z):
        return z / (1.0 + math.exp(-z))

    def mha_naive(hs, wq, wk, wv, wo):  # one attention expert over one sequence
        qs = [wq @ h for h in hs]
        ks = [wk @ h for h in hs]
        vs = [wv @ h for h in hs]
        outs = []
        for t in range(T):
            cat = np.zeros(d)
            for hh in range(H):
                kvh = hh // (H // Hkv)
                q = rope(qs[t][hh * hd:(hh + 1) * hd], t)
                sc = []
                for u in range(t + 1):
                    k = rope(ks[u][kvh * hd:(kvh + 1) * hd], u)
                    sc.append(sum(q[i] * k[i] for i in range(hd)) / math.sqrt(hd))
                w, _ = softmax(sc)
                for u in range(t + 1):
                    cat[hh * hd:(hh + 1) * hd] += w[u] * vs[u][kvh * hd:(kvh + 1) * hd]
            outs.append(wo @ cat)
        return outs

    def ffn_naive(h, i, l):
        g = P["w_gate"][i, l] @ h
        up = P["w_up"][i, l] @ h
        act = np.array([silu(g[j]) * up[j] for j in range(b.d_ff)])
        return P["w_down"][i, l] @ act

    cap = None
    if s.capacity_factor > 0:
        cap = math.ceil(s.capacity_factor * T * K / Ef)
    head = P["wte"] if b.tie_embeddings else P["w_head"]
    xs = [[P["wte"][tokens[bb, t]].copy() for t in range(T)] for bb in range(B)]
    aux, lbs, zs = 0.0, [], []
    sels, keeps, amasks = [], [], []
    for l in range(L):
        new_xs = []
        # per-layer accumulators for the auxiliary losses
        count_b = np.zeros((B, Ef))   # kept top-k assignments per sequence and expert
        psum_b = np.zeros((B, Ef))    # sum of p per sequence and expert
        zsum = 0.0
        sel_l = np.zeros((B, T, Ef))
        keep_l = np.zeros((B, T, Ef))
        am_l = np.zeros((B, T, Ea))
        for bb in range(B):
            hs = [ln(x, P["ln"][l]) for x in xs[bb]]
            # attention
            if s.method == "btx":
                att = mha_naive(hs, P["wq"][l], P["wk"][l], P["wv"][l], P["wo"][l])
            else:
                per_expert = []
                for j in range(Ea):
                    wk = P["wk"][l] if s.shared_kv else P["wk"][j, l]
                    wv = P["wv"][l] if s.shared_kv else P["wv"][j, l]
                    per_expert.append(mha_naive(hs, P["wq"][j, l], wk, wv, P["wo"][j, l]))
                att = []
                for t in range(T):
                    g, _ = softmax(list(P["att_router"][l] @ hs[t]))
                    use = topk(g, s.att_top_k) if s.att_top_k > 0 else list(range(Ea))
                    for j in use:
                        am_l[bb, t, j] = 1
                    att.append(sum(g[j] * per_expert[j][t] for j in use))
            # FFN mixture, tokens in order, per-expert counters for the capacity
            used = [0] * Ef
            seq = []
            for t in range(T):
                p, lse = softmax(list(P["ffn_router"][l] @ hs[t]))
                chosen = topk(p, K)
                norm = sum(p[i] for i in chosen) if s.ffn_renormalize else 1.0
                moe = np.zeros(d)
                for i in chosen:
                    sel_l[bb, t, i] = 1
                    used[i] += 1
                    if cap is not None and used[i] > cap:
                        continue  # dropped: later than the expert's first `cap` assignments
                    count_b[bb, i] += 1  # f_i counts kept assignments (mixture.h)
                    keep_l[bb, t, i] = 1
                    moe += p[i] / norm * ffn_naive(hs[t], i, l)
                for i in range(Ef):
                    psum_b[bb, i] += p[i]
                zsum += lse * lse
                seq.append(xs[bb][t] + att[t] + moe)
            new_xs.append(seq)
        xs = new_xs
        if s.lb_per_sequence:
            lb = sum(Ef * sum((count_b[bb, i] / (T * K)) * (psum_b[bb, i] / T) for i in range(Ef))
                     for bb in range(B)) / B
        else:
            lb = Ef * sum((count_b[:, i].sum() / (B * T * K)) * (psum_b[:, i].sum() / (B * T))
                          for i in range(Ef))
        z = zsum / (B * T)
        lbs.append(lb)
        zs.append(z)
        aux += s.lb_coef * lb + s.z_coef * z
        sels.append(sel_l)
        keeps.append(keep_l)
        amasks.append(am_l)
    logits = np.zeros((B, T, b.vocab_size))
    losses = []
    for bb in range(B):
        for t in range(T):
            lg = head @ ln(xs[bb][t], P["ln_f"])
            logits[bb, t] = lg
            if targets[bb, t] >= 0:
                _, lse = softmax(list(lg))
                losses.append(lse - lg[targets[bb, t]])
    return dict(logits=logits, token_loss=sum(losses) / len(losses), aux=aux, lb=lbs, z=zs,
                sel=sels, keep=keeps, amask=amasks)


def tiny(method, Hkv=2, tied=False, k=1, renorm=False, att_top_k=0, per_seq=True, cap=0.0,
         d=8, H=2, L=2, f=6, V=7, Ea=3, Ef=4, lb=0.3, z=0.05):
    # Large auxiliary coefficients so their gradients are well inside gradcheck's reach.
    base = tm.Shape(n_layers=L, d_model=d, n_heads=H, n_kv_heads=Hkv, d_ff=f, vocab_size=V,
                    tie_embeddings=tied)
    return tx.MixShape(base, method=method, n_att_experts=Ea, n_ffn_experts=Ef, ffn_top_k=k,
                       ffn_renormalize=renorm, att_top_k=att_top_k, lb_coef=lb, z_coef=z,
                       lb_per_sequence=per_seq, capacity_factor=cap)


def batch(s, g, B=2, T=5):
    V = s.base.vocab_size
    tok = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    tgt[0, 1] = -1
    return tok, tgt


CONFIGS = [
    ("btx top2 renorm per-seq", dict(method="btx", Hkv=2, k=2, renorm=True)),
    ("bam soft top1", dict(method="bam", Hkv=2, k=1)),
    ("bam shared-kv GQA tied batch-lb", dict(method="bam-shared-kv", Hkv=1, tied=True, k=1,
                                             per_seq=False)),
    ("bam att-top2 ffn-top2 capacity", dict(method="bam", Hkv=2, k=2, att_top_k=2, cap=0.5)),
]

# Checked against the literal reading only (the gradients of its pieces are covered above).
NAIVE_ONLY = [
    ("btx top2 renorm capacity batch-lb", dict(method="btx", Hkv=2, k=2, renorm=True,
                                               per_seq=False, cap=0.6)),
]

# ---- 1. literal reading of the spec vs the vectorised model ----
g = torch.Generator().manual_seed(11)
for label, kw in CONFIGS + NAIVE_ONLY:
    s = tiny(d=16, H=4, **kw)
    P = tx.init_params(s, g, std=0.3, router_std=0.5)
    tok, tgt = batch(s, g, B=2, T=6)
    out = tx.forward({k: v.double() for k, v in P.items()}, tok, s, tgt)
    nv = naive_forward({k: v.numpy() for k, v in P.items()}, tok.numpy(), tgt.numpy(), s)
    e_log = np.abs(out["logits"].detach().numpy() - nv["logits"]).max()
    e_tok = abs(out["token_loss"].item() - nv["token_loss"])
    e_aux = abs(out["aux_loss"].item() - nv["aux"])
    e_lb = max(abs(a.item() - c) for a, c in zip(out["lb"], nv["lb"]))
    e_z = max(abs(a.item() - c) for a, c in zip(out["z"], nv["z"]))
    same_sel = all(np.array_equal(a.numpy(), c) for a, c in zip(out["ffn_sel"], nv["sel"]))
    same_keep = all(np.array_equal(a.numpy(), c) for a, c in zip(out["ffn_keep"], nv["keep"]))
    same_am = s.att_top_k == 0 or all(np.array_equal(a.numpy(), c)
                                      for a, c in zip(out["att_mask"], nv["amask"]))
    dropped = sum(int((a - c).sum()) for a, c in zip(out["ffn_sel"], out["ffn_keep"]))
    check(e_log < 1e-12, f"{label}: naive vs torch logits max err {e_log:.3g}")
    check(e_tok < 1e-12, f"{label}: token loss err {e_tok:.3g}")
    check(e_aux < 1e-12 and e_lb < 1e-12 and e_z < 1e-12,
          f"{label}: aux err {e_aux:.3g} (L_lb {e_lb:.3g}, L_z {e_z:.3g})")
    check(same_sel and same_keep and same_am, f"{label}: routing differs "
          f"(top-k {same_sel}, kept {same_keep}, attention mask {same_am})")
    if s.capacity_factor > 0:
        check(dropped > 0, f"{label}: the capacity case drops nothing")
    print(f"spec-literal vs vectorised ({label}): logits {e_log:.2e}, token loss {e_tok:.2e}, "
          f"aux {e_aux:.2e} (aux {out['aux_loss'].item():.6f}), dropped {dropped}")

# ---- 2. top-k ties and the renormalisation identity ----
p = torch.tensor([[0.2, 0.3, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4]],
                 dtype=torch.float64)
m1 = tx.stable_topk_mask(p, 1)
m2 = tx.stable_topk_mask(p, 2)
check(m1.argmax(-1).tolist() == [1, 0, 1], f"top-1 ties to the lower index: {m1.tolist()}")
check(m2.tolist() == [[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]], f"top-2 ties: {m2.tolist()}")
zl = torch.randn(5, 4, generator=g, dtype=torch.float64)
pp = torch.softmax(zl, -1)
mk = tx.stable_topk_mask(pp, 2)
ren = pp * mk / (pp * mk).sum(-1, keepdim=True)
sm = torch.softmax(zl.masked_fill(mk == 0, float("-inf")), -1)
err = (ren - sm).abs().max().item()
check(err < 1e-15, f"renormalised top-k vs softmax(TopK(logits)): {err:.3g}")
print(f"top-k ties to the lower index; renormalised top-2 vs softmax over top-2 logits: "
      f"{err:.2e}")

# ---- 3. gradcheck of every parameter (float64, routing fixed) ----
for label, kw in CONFIGS:
    s = tiny(**kw)
    P = tx.init_params(s, g, std=0.3, router_std=0.5)
    tok, tgt = batch(s, g)
    names = list(P.keys())
    P64 = {k: v.double().requires_grad_(True) for k, v in P.items()}
    route = tx.forward(P64, tok, s, tgt)
    margin = tx.min_margin(route)
    route["loss"].backward()
    free_grads = {k: P64[k].grad.clone() for k in names}
    inputs = tuple(P[k].double().requires_grad_(True) for k in names)

    def fn(*ps):
        return tx.forward(dict(zip(names, ps)), tok, s, tgt, fixed_routing=route)["loss"]

    ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                  raise_exception=False)
    check(ok, f"gradcheck ({label})")
    fixed = torch.autograd.grad(fn(*inputs), inputs)
    e = max((a - free_grads[k]).abs().max().item() for a, k in zip(fixed, names))
    check(e == 0.0, f"{label}: gradients with the routing chosen inside vs fixed: {e:.3g}")
    dropped = sum(int((a - c).sum()) for a, c in zip(route["ffn_sel"], route["ffn_keep"]))
    print(f"gradcheck {label} ({len(names)} tensors, routing margin {margin:.3g}, "
          f"dropped {dropped}): {'ok' if ok else 'FAILED'}")

print(f"{n_pass} passed, {n_fail} failed")
sys.exit(0 if n_fail == 0 and n_pass > 0 else 1)
