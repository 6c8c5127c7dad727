#!/usr/bin/env python3
"""Write the PyTorch reference of the mixture models for tests/reference/test_mixture_reference.c.

    make_mixture_reference.py --out FILE.h5 --case {btx,bam,bam_shared_kv,bam_top2,btx_capacity}
                              [--dtype float64|float32] [--seed N] [--margins]

Builds a tiny mixture (torch_mixture.py) with random float32 parameters (matrices N(0, 0.1^2),
norm scales 1 + 0.1 N(0,1), routers N(0, 0.5^2) so the routing is decisive), random tokens
and targets (a few targets = -1), and records in HDF5:
    attrs          the dense shape (n_layers ... norm_eps), the mixture shape (method as the
                   bam_method enum and its name, n_att_experts, n_ffn_experts, ffn_top_k,
                   ffn_renormalize, att_top_k, lb_coef, z_coef, lb_per_sequence,
                   capacity_factor), the batch (B, T, seq_len, max_batch), the optimiser
                   (lr, beta1, beta2, eps, weight_decay, clip_norm, steps), the routing
                   margins (min_margin over all eleven forwards) and dropped assignments
    params/<name>  float32 initial parameters, C tensor-table names and shapes
    tokens, targets  int32 (B, T)
    logits (B,T,V); dlogits d loss / d logits; loss (token + aux); token_loss; aux_loss;
    token_losses (B*T, 0 where ignored)
    lb, z          (L) the unscaled per-layer L_lb and L_z
    ffn_share (L,Ef) share of top-k assignments (before dropping); ffn_share_kept (after);
    att_gate (L,Ea) mean gate as used; ffn_entropy, att_entropy (L); n_dropped (L)
    grads/<name>   d loss / d param (tied: wte holds embedding + head gradient)
    losses_10, aux_losses_10, grad_norms_10   before each of ten AdamW steps on the same batch
    params_10/<name>  parameters after the ten steps

Float64 by default from float32-exact parameters (like make_reference.py): the differences
the C test measures are the C model's own float32 rounding.

Routing must be the same decision in float64 torch and float32 C, or the comparison means
nothing: at every one of the eleven forwards (the first and the ten training steps) the gap
between the k-th and (k+1)-th router logit (FFN top-k; attention top-k) must exceed
MIN_MARGIN = 1e-3 (float32 rounding of the router logits is ~1e-6), else the script fails.
The capacity cases (bam_top2, btx_capacity) must drop assignments in every layer, else the
script fails too.

Capacity and f_i, as mixture.h specifies: capacity is per sequence, C = ceil(c * T * k / Ef)
with T the batch's sequence length, first come first served in token order; f_i counts the
KEPT assignments, divided by tokens * k (torch_mixture.F_COUNTS_DROPPED = False); the gates
(renormalised or not) are decided over the full top-k before dropping.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_mixture as tx  # noqa: E402
import torch_model as tm  # noqa: E402


def _shape(Hkv, tied):
    return tm.Shape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=Hkv, d_ff=24, vocab_size=61,
                    tie_embeddings=tied)


# seq_len (the C model's maximum context) may exceed the batch's T; max_batch likewise.
# The auxiliary coefficients differ between cases so a C side that ignores them shows.
CASES = {
    "btx": dict(shape=tx.MixShape(_shape(4, False), method="btx", n_att_experts=3,
                                  n_ffn_experts=4, ffn_top_k=2, ffn_renormalize=True,
                                  att_top_k=0, lb_coef=0.01, z_coef=0.001,
                                  lb_per_sequence=True, capacity_factor=0.0),
                B=3, T=12, seq_len=12, max_batch=3, seed=46),
    "bam": dict(shape=tx.MixShape(_shape(4, False), method="bam", n_att_experts=3,
                                  n_ffn_experts=4, ffn_top_k=1, ffn_renormalize=False,
                                  att_top_k=0, lb_coef=0.05, z_coef=0.01,
                                  lb_per_sequence=True, capacity_factor=0.0),
                B=3, T=12, seq_len=16, max_batch=4, seed=26),
    "bam_shared_kv": dict(shape=tx.MixShape(_shape(2, True), method="bam-shared-kv",
                                            n_att_experts=3, n_ffn_experts=4, ffn_top_k=1,
                                            ffn_renormalize=False, att_top_k=0, lb_coef=0.03,
                                            z_coef=0.005, lb_per_sequence=False,
                                            capacity_factor=0.0),
                          B=3, T=12, seq_len=16, max_batch=3, seed=7),
    "bam_top2": dict(shape=tx.MixShape(_shape(4, False), method="bam", n_att_experts=3,
                                       n_ffn_experts=4, ffn_top_k=2, ffn_renormalize=False,
                                       att_top_k=2, lb_coef=0.02, z_coef=0.002,
                                       lb_per_sequence=True, capacity_factor=1.0),
                     B=3, T=12, seq_len=12, max_batch=3, seed=40),
    # Capacity with renormalised top-2 and batch-level L_lb; c * T * k / Ef = 7.5 is not an
    # integer (ceil gives 8, floor 7) and seq_len > T (ceil(c * seq_len * k / Ef) = 10).
    "btx_capacity": dict(shape=tx.MixShape(_shape(2, False), method="btx", n_att_experts=3,
                                           n_ffn_experts=4, ffn_top_k=2, ffn_renormalize=True,
                                           att_top_k=0, lb_coef=0.04, z_coef=0.003,
                                           lb_per_sequence=False, capacity_factor=1.25),
                         B=3, T=12, seq_len=16, max_batch=4, seed=9),
}

OPT = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, steps=10)
N_IGNORED = 4  # targets set to -1
MIN_MARGIN = 1e-3


def build_case(name, seed=None):
    c = CASES[name]
    s, B, T = c["shape"], c["B"], c["T"]
    g = torch.Generator().manual_seed(c["seed"] if seed is None else seed)
    params32 = tx.init_params(s, g, std=0.1, router_std=0.5)
    tokens = torch.randint(0, s.base.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, s.base.vocab_size, (B, T), generator=g)
    flat = targets.view(-1)
    ignored = torch.randperm(B * T, generator=g)[:N_IGNORED]
    flat[ignored] = -1
    return c, params32, tokens, targets


def run(c, params32, tokens, targets, dtype):
    """One forward+backward, then ten AdamW steps; returns everything recorded."""
    s = c["shape"]
    names = list(params32.keys())  # C tensor-table order
    params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in params32.items()}
    out = tx.forward(params, tokens, s, targets)
    out["logits"].retain_grad()
    out["loss"].backward()
    grads = {k: params[k].grad.detach().clone() for k in names}
    margins = [tx.min_margin(out)]

    p = {k: v.to(dtype).clone().requires_grad_(True) for k, v in params32.items()}
    groups = [
        {"params": [p[k] for k in names if k not in tx.NO_DECAY],
         "weight_decay": OPT["weight_decay"]},
        {"params": [p[k] for k in names if k in tx.NO_DECAY], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]),
                            eps=OPT["eps"])
    losses, auxes, norms, drops = [], [], [], []
    for _ in range(OPT["steps"]):
        opt.zero_grad(set_to_none=True)
        o = tx.forward(p, tokens, s, targets)
        o["loss"].backward()
        n = torch.nn.utils.clip_grad_norm_([p[k] for k in names], OPT["clip_norm"])
        opt.step()
        losses.append(o["loss"].item())
        auxes.append(o["aux_loss"].item())
        norms.append(float(n))
        margins.append(tx.min_margin(o))
        drops.append(sum(int((a - b).sum()) for a, b in zip(o["ffn_sel"], o["ffn_keep"])))
    return dict(names=names, out=out, grads=grads, p=p, losses=losses, auxes=auxes,
                norms=norms, margins=margins, drops=drops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--seed", type=int, help="override the case's seed (to search for one)")
    ap.add_argument("--margins", action="store_true",
                    help="only report the routing margins and drops, write nothing")
    a = ap.parse_args()
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    torch.set_num_threads(1)

    c, params32, tokens, targets = build_case(a.case, a.seed)
    s = c["shape"]
    r = run(c, params32, tokens, targets, dtype)
    out = r["out"]
    st = tx.route_stats(out, s)
    mm = min(r["margins"])
    print(f"make_mixture_reference: case {a.case} seed {a.seed or c['seed']}: min routing "
          f"margin {mm:.4g} (first forward {r['margins'][0]:.4g}, per step "
          f"{' '.join(f'{x:.3g}' for x in r['margins'][1:])}); dropped per layer "
          f"{st['n_dropped']} (per step totals {r['drops']})")
    if a.margins:
        return
    if not a.out:
        ap.error("--out is required")
    if not mm > MIN_MARGIN:
        sys.exit(f"make_mixture_reference: case {a.case}: routing margin {mm:.3g} <= "
                 f"{MIN_MARGIN}: float32 and float64 could route differently; pick another seed")
    if s.capacity_factor > 0 and not all(n > 0 for n in st["n_dropped"]):
        sys.exit(f"make_mixture_reference: case {a.case}: capacity drops nothing in some "
                 f"layer ({st['n_dropped']}); pick another seed")

    names = r["names"]
    b = s.base
    with h5py.File(a.out, "w") as f:
        at = f.attrs
        at["case"] = a.case
        at["dtype"] = a.dtype
        for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size"):
            at[k] = np.int32(getattr(b, k))
        at["tie_embeddings"] = np.int32(1 if b.tie_embeddings else 0)
        at["rope_base"] = np.float64(b.rope_base)
        at["norm_eps"] = np.float64(b.norm_eps)
        at["method"] = np.int32(tx.METHODS.index(s.method))
        at["method_name"] = s.method
        for k in ("n_att_experts", "n_ffn_experts", "ffn_top_k", "att_top_k"):
            at[k] = np.int32(getattr(s, k))
        at["ffn_renormalize"] = np.int32(1 if s.ffn_renormalize else 0)
        at["lb_per_sequence"] = np.int32(1 if s.lb_per_sequence else 0)
        for k in ("lb_coef", "z_coef", "capacity_factor"):
            at[k] = np.float64(getattr(s, k))
        cap = tx.capacity(s, c["T"])
        at["capacity"] = np.int32(cap if cap is not None else 0)
        for k in ("B", "T", "seq_len", "max_batch"):
            at[k] = np.int32(c[k])
        for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "clip_norm"):
            at[k] = np.float64(OPT[k])
        at["steps"] = np.int32(OPT["steps"])
        at["min_margin"] = np.float64(mm)
        at["n_tensors"] = np.int32(len(names))
        at["tensor_names"] = ",".join(names)
        for k in names:
            f.create_dataset("params/" + k, data=params32[k].numpy().astype(np.float32))
            f.create_dataset("grads/" + k, data=r["grads"][k].double().numpy())
            f.create_dataset("params_10/" + k, data=r["p"][k].detach().double().numpy())
        f.create_dataset("tokens", data=tokens.numpy().astype(np.int32))
        f.create_dataset("targets", data=targets.numpy().astype(np.int32))
        f.create_dataset("logits", data=out["logits"].detach().double().numpy())
        f.create_dataset("dlogits", data=out["logits"].grad.double().numpy())
        for k in ("loss", "token_loss", "aux_loss"):
            f.create_dataset(k, data=np.float64(out[k].item()))
        f.create_dataset("token_losses", data=out["token_losses"].detach().double().numpy())
        f.create_dataset("lb", data=np.array([v.item() for v in out["lb"]], dtype=np.float64))
        f.create_dataset("z", data=np.array([v.item() for v in out["z"]], dtype=np.float64))
        for k in ("ffn_share", "ffn_share_kept", "ffn_entropy", "n_dropped"):
            f.create_dataset(k, data=np.array(st[k], dtype=np.float64))
        if s.is_bam:
            f.create_dataset("att_gate", data=np.array(st["att_gate"], dtype=np.float64))
            f.create_dataset("att_entropy", data=np.array(st["att_entropy"], dtype=np.float64))
        f.create_dataset("losses_10", data=np.array(r["losses"], dtype=np.float64))
        f.create_dataset("aux_losses_10", data=np.array(r["auxes"], dtype=np.float64))
        f.create_dataset("grad_norms_10", data=np.array(r["norms"], dtype=np.float64))
    print(f"make_mixture_reference: case {a.case} ({a.dtype}) loss {out['loss'].item():.6f} "
          f"(token {out['token_loss'].item():.6f} + aux {out['aux_loss'].item():.6f}) "
          f"losses_10 {r['losses'][0]:.6f} .. {r['losses'][-1]:.6f} -> {a.out}")


if __name__ == "__main__":
    main()
