#!/usr/bin/env python3
"""Checks the PyTorch reference itself (torch_model.py), so that the C comparison in
test_reference.c rests on a reference known to follow method.md section 2:

 1. a literal, loop-by-loop NumPy reading of the specification (per position, per head,
    per pair of rotated dimensions) gives the same logits and loss as the vectorised model,
    for multi-head and grouped-query attention, tied and untied;
 2. RoPE rotate-half equals multiplication of z_i = x_i + i*x_{i+hd/2} by exp(i*angle);
 3. autograd gradients of the float64 model pass torch.autograd.gradcheck (finite
    differences) for every parameter;
 4. torch.optim.AdamW with the settings used equals the update formula of include/bam/optim.h,
    and clip_grad_norm_ scales by max_norm / global norm.
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

import torch_model as tm  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads only cost

n_pass = n_fail = 0


def check(cond, what):
    global n_pass, n_fail
    if cond:
        n_pass += 1
    else:
        n_fail += 1
        print("FAIL", what)


def naive_forward(P, tokens, targets, s):
    """Scalar loops over the spec, float64 NumPy; no torch."""
    P = {k: v.astype(np.float64) for k, v in P.items()}
    B, T = tokens.shape
    d, H, Hkv, hd = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim
    half = hd // 2
    eps = s.norm_eps

    def ln(v, g):
        mu = sum(v) / len(v)
        var = sum((vi - mu) ** 2 for vi in v) / len(v)
        return np.array([(v[i] - mu) / math.sqrt(var + eps) * g[i] for i in range(len(v))])

    def rope(vec, pos):
        out = vec.copy()
        for i in range(half):
            a = pos * s.rope_base ** (-2.0 * i / hd)
            x1, x2 = vec[i], vec[i + half]
            out[i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[i + half] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    def silu(z):
        return z / (1.0 + math.exp(-z))

    head = P["wte"] if s.tie_embeddings else P["w_head"]
    logits = np.zeros((B, T, s.vocab_size))
    losses = []
    for b in range(B):
        xs = [P["wte"][tokens[b, t]].copy() for t in range(T)]
        for l in range(s.n_layers):
            hs = [ln(x, P["ln"][l]) for x in xs]
            qs = [P["wq"][l] @ h for h in hs]
            ks = [P["wk"][l] @ h for h in hs]
            vs = [P["wv"][l] @ h for h in hs]
            new = []
            for t in range(T):
                cat = np.zeros(d)
                for hh in range(H):
                    kvh = hh // (H // Hkv)
                    q = rope(qs[t][hh * hd:(hh + 1) * hd], t)
                    sc = []
                    for u in range(t + 1):
                        k = rope(ks[u][kvh * hd:(kvh + 1) * hd], u)
                        sc.append(sum(q[i] * k[i] for i in range(hd)) / math.sqrt(hd))
                    m = max(sc)
                    e = [math.exp(z - m) for z in sc]
                    z = sum(e)
                    for u in range(t + 1):
                        cat[hh * hd:(hh + 1) * hd] += e[u] / z * vs[u][kvh * hd:(kvh + 1) * hd]
                attn = P["wo"][l] @ cat
                g = P["w_gate"][l] @ hs[t]
                up = P["w_up"][l] @ hs[t]
                act = np.array([silu(g[i]) * up[i] for i in range(s.d_ff)])
                new.append(xs[t] + attn + P["w_down"][l] @ act)
            xs = new
        for t in range(T):
            lg = head @ ln(xs[t], P["ln_f"])
            logits[b, t] = lg
            if targets[b, t] >= 0:
                m = lg.max()
                lse = m + math.log(sum(math.exp(v - m) for v in lg))
                losses.append(lse - lg[targets[b, t]])
    return logits, sum(losses) / len(losses)


def tiny(tied, Hkv, d=8, H=2, L=2, f=6, V=7):
    return tm.Shape(n_layers=L, d_model=d, n_heads=H, n_kv_heads=Hkv, d_ff=f, vocab_size=V,
                    tie_embeddings=tied)


def batch(s, g, B=2, T=5):
    tok = torch.randint(0, s.vocab_size, (B, T), generator=g)
    tgt = torch.randint(0, s.vocab_size, (B, T), generator=g)
    tgt[0, 1] = -1
    return tok, tgt


# ---- 1. literal reading of the spec vs the vectorised model ----
g = torch.Generator().manual_seed(7)
for tied, H, Hkv in ((False, 4, 4), (True, 4, 2), (False, 4, 1)):
    s = tiny(tied, Hkv, d=16, H=H)
    P = tm.init_params(s, g, std=0.3)
    tok, tgt = batch(s, g, B=2, T=6)
    P64 = {k: v.double() for k, v in P.items()}
    lt, loss_t, _ = tm.forward(P64, tok, s, tgt)
    ln_, loss_n = naive_forward({k: v.numpy() for k, v in P.items()}, tok.numpy(), tgt.numpy(), s)
    err = np.abs(lt.detach().numpy() - ln_).max()
    check(err < 1e-12, f"naive vs torch logits (tied={tied}, Hkv={Hkv}): max err {err:.3g}")
    check(abs(loss_t.item() - loss_n) < 1e-12,
          f"naive vs torch loss (tied={tied}, Hkv={Hkv}): {loss_t.item()} vs {loss_n}")
    print(f"spec-literal vs vectorised (H={H} Hkv={Hkv} tied={int(tied)}): "
          f"logits max err {err:.2e}, loss {loss_t.item():.12f} vs {loss_n:.12f}")

# ---- 2. RoPE as complex rotation ----
hd, T = 8, 9
x = torch.randn(2, 3, T, hd, generator=g, dtype=torch.float64)
cos, sin = tm.rope_tables(T, hd, 10000.0, torch.float64)
z = torch.complex(x[..., :hd // 2], x[..., hd // 2:])
ang = torch.arange(T, dtype=torch.float64)[:, None] * \
    10000.0 ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
zr = z * torch.polar(torch.ones_like(ang), ang)
ref = torch.cat([zr.real, zr.imag], dim=-1)
err = (tm.apply_rope(x, cos, sin) - ref).abs().max().item()
check(err < 1e-13, f"rope vs complex rotation: {err:.3g}")
print(f"RoPE vs complex rotation: max err {err:.2e}")

# ---- 3. gradcheck of every parameter (float64) ----
for tied, Hkv in ((False, 2), (True, 1)):
    s = tiny(tied, Hkv)
    P = tm.init_params(s, g, std=0.3)
    tok, tgt = batch(s, g)
    names = list(P.keys())
    inputs = tuple(P[k].double().requires_grad_(True) for k in names)

    def fn(*ps):
        return tm.forward(dict(zip(names, ps)), tok, s, tgt)[1]

    ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                  raise_exception=False)
    check(ok, f"gradcheck (tied={tied}, Hkv={Hkv})")
    print(f"gradcheck tied={int(tied)} Hkv={Hkv}: {'ok' if ok else 'FAILED'}")

# ---- 4. AdamW and clipping semantics ----
b1, b2, eps, lr, wd = 0.9, 0.95, 1e-8, 3e-3, 0.1
p0 = torch.randn(50, generator=g, dtype=torch.float64)
p = p0.clone().requires_grad_(True)
opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
pm, m, v = p0.clone(), torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
for t in range(1, 4):
    gr = torch.randn(50, generator=g, dtype=torch.float64)
    p.grad = gr.clone()
    opt.step()
    m = b1 * m + (1 - b1) * gr
    v = b2 * v + (1 - b2) * gr * gr
    pm = pm - lr * ((m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * pm)
err = (p.detach() - pm).abs().max().item()
check(err < 1e-14, f"AdamW vs optim.h formula: {err:.3g}")
print(f"torch AdamW vs optim.h formula (3 steps): max err {err:.2e}")
a = torch.randn(10, generator=g, dtype=torch.float64).requires_grad_(True)
c = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_(True)
a.grad, c.grad = 3 * torch.ones(10, dtype=torch.float64), 2 * torch.ones(7, dtype=torch.float64)
n = float(torch.nn.utils.clip_grad_norm_([a, c], 1.0))
check(abs(n - math.sqrt(90 + 28)) < 1e-12, "clip norm value")
tot = math.sqrt(float((a.grad ** 2).sum() + (c.grad ** 2).sum()))
check(abs(tot - 1.0) < 1e-5, f"clipped norm {tot}")

print(f"{n_pass} passed, {n_fail} failed")
sys.exit(0 if n_fail == 0 and n_pass > 0 else 1)
