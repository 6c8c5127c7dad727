#!/usr/bin/env python3
"""Write the PyTorch reference for tests/reference/test_reference.c (llm.c test_gpt2 style).

    make_reference.py --out FILE.h5 --case {mha,gqa_tied} [--dtype float64|float32]

Builds a tiny model with random float32 parameters (fixed seed), random tokens and targets
(a few targets = -1, ignored), and records in HDF5:
    attrs          the shape (n_layers, d_model, n_heads, n_kv_heads, d_ff, vocab_size,
                   seq_len, tie_embeddings, rope_base, norm_eps), the batch (B, T), the
                   optimiser settings (lr, beta1, beta2, eps, weight_decay, clip_norm, steps)
    params/<name>  float32 initial parameters, C tensor-table names and shapes
    tokens, targets  int32 (B, T)
    logits         (B, T, V);  dlogits  d loss / d logits (B, T, V)
    loss           scalar;  token_losses (B*T), 0 where ignored
    grads/<name>   d loss / d param (for a tied model wte holds embedding + head gradient)
    losses_10      loss before each of ten AdamW steps on the same batch
    grad_norms_10  gradient norm before clipping at each of those steps
    params_10/<name>  parameters after the ten steps

The forward/backward is computed in float64 by default from the (float32-exact) parameters,
so the reference carries no rounding error of its own at float32 scale: the differences the C
test measures are the C model's own float32 rounding. --dtype float32 gives a torch float32
run instead (for comparison).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_model as tm  # noqa: E402

CASES = {
    # seq_len (the C model's maximum context) may exceed the batch's T; max_batch likewise.
    "mha": dict(shape=tm.Shape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=48,
                               vocab_size=61, tie_embeddings=False),
                B=3, T=12, seq_len=12, max_batch=3, seed=1234),
    "gqa_tied": dict(shape=tm.Shape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                                    vocab_size=61, tie_embeddings=True),
                     B=3, T=12, seq_len=16, max_batch=4, seed=4321),
}

OPT = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, steps=10)
N_IGNORED = 4  # targets set to -1


def build_case(name):
    c = CASES[name]
    s, B, T = c["shape"], c["B"], c["T"]
    g = torch.Generator().manual_seed(c["seed"])
    params32 = tm.init_params(s, g, std=0.1)
    tokens = torch.randint(0, s.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, s.vocab_size, (B, T), generator=g)
    flat = targets.view(-1)
    ignored = torch.randperm(B * T, generator=g)[:N_IGNORED]
    flat[ignored] = -1
    return c, params32, tokens, targets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    a = ap.parse_args()
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    torch.set_num_threads(1)

    c, params32, tokens, targets = build_case(a.case)
    s = c["shape"]
    names = list(params32.keys())  # C tensor-table order

    # ---- one forward + backward ----
    params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in params32.items()}
    logits, loss, token_losses = tm.forward(params, tokens, s, targets)
    logits.retain_grad()
    loss.backward()
    grads = {k: params[k].grad.detach().clone() for k in names}

    # ---- ten AdamW steps on the same batch, clipping at clip_norm ----
    p = {k: v.to(dtype).clone().requires_grad_(True) for k, v in params32.items()}
    groups = [
        {"params": [p[k] for k in names if k not in tm.NORM_NAMES],
         "weight_decay": OPT["weight_decay"]},
        {"params": [p[k] for k in names if k in tm.NORM_NAMES], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]),
                            eps=OPT["eps"])
    losses, norms = [], []
    for _ in range(OPT["steps"]):
        opt.zero_grad(set_to_none=True)
        _, l, _ = tm.forward(p, tokens, s, targets)
        l.backward()
        n = torch.nn.utils.clip_grad_norm_([p[k] for k in names], OPT["clip_norm"])
        opt.step()
        losses.append(l.item())
        norms.append(float(n))

    with h5py.File(a.out, "w") as f:
        at = f.attrs
        at["case"] = a.case
        at["dtype"] = a.dtype
        for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size"):
            at[k] = np.int32(getattr(s, k))
        at["tie_embeddings"] = np.int32(1 if s.tie_embeddings else 0)
        at["rope_base"] = np.float64(s.rope_base)
        at["norm_eps"] = np.float64(s.norm_eps)
        for k in ("B", "T", "seq_len", "max_batch"):
            at[k] = np.int32(c[k])
        for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "clip_norm"):
            at[k] = np.float64(OPT[k])
        at["steps"] = np.int32(OPT["steps"])
        at["n_tensors"] = np.int32(len(names))
        at["tensor_names"] = ",".join(names)
        for k in names:
            f.create_dataset("params/" + k, data=params32[k].numpy().astype(np.float32))
            f.create_dataset("grads/" + k, data=grads[k].double().numpy())
            f.create_dataset("params_10/" + k, data=p[k].detach().double().numpy())
        f.create_dataset("tokens", data=tokens.numpy().astype(np.int32))
        f.create_dataset("targets", data=targets.numpy().astype(np.int32))
        f.create_dataset("logits", data=logits.detach().double().numpy())
        f.create_dataset("dlogits", data=logits.grad.double().numpy())
        f.create_dataset("loss", data=np.float64(loss.item()))
        f.create_dataset("token_losses", data=token_losses.detach().double().numpy())
        f.create_dataset("losses_10", data=np.array(losses, dtype=np.float64))
        f.create_dataset("grad_norms_10", data=np.array(norms, dtype=np.float64))
    print(f"make_reference: case {a.case} ({a.dtype}) loss {loss.item():.6f} "
          f"losses_10 {losses[0]:.6f} .. {losses[-1]:.6f} -> {a.out}")


if __name__ == "__main__":
    main()
