#!/usr/bin/python3
"""The training step of bench/bench.c (bam-bench), written independently in PyTorch, float32.

    /usr/bin/python3 bench/torch_bench.py [--shape quick|paper-small|all]
        [--kind dense|btx|bam|bam-shared-kv|all] [--threads T] [--steps N] [--warmup W]
        [--ranks R] [--params-only] [--foreach 0|1]

Same models, shapes and step as bam-bench: the dense model and the BTX, BAM and BAM shared-KV
mixtures (4 experts, FFN top-1 over a full softmax, no renormalisation; BAM: soft attention
router over every attention expert), untied embeddings; one step = forward + backward (token
loss + 0.01 load-balancing + 0.001 z-loss, per-sequence f_i, P_i) + clip_grad_norm_ 1.0 +
torch.optim.AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices, none on
norms and routers). W warm-up steps (default 2), then the median of N timed steps; random
tokens. Prints one JSON line per case: tokens/s, model GFLOP/s (3 x the forward FLOPs per token
of docs/method.md section 5, the same count as bam_mixture_flops_per_token), peak resident
memory (VmHWM), and the parameter count (bench/compare.sh checks it against bam-bench's).

Written for speed the way one would in PyTorch 1.13 (no scaled_dot_product_attention, no
torch.compile there): fused QKV and gate/up projections; all attention experts of a layer in
one projection GEMM and one batched matmul (shared-KV: the one K/V broadcast over the experts'
batch dimension; stacking the experts' queries along the time axis instead ran 15% slower on
an AVX-512 machine, 706 against 834 tokens/s at the quick shape on one thread); the gated expert outputs concatenated so the output projection
of all experts is one GEMM; FFN experts on their tokens only (sort by expert, split, one
SwiGLU per expert, index_add_ back).

--threads T sets torch.set_num_threads(T) and, before torch is imported, OMP_NUM_THREADS and
OPENBLAS_NUM_THREADS (Debian's torch calls OpenBLAS through libblas.so.3, whose thread pool
torch.set_num_threads does not control), and OMP_WAIT_POLICY=PASSIVE unless set (torch's
OpenMP threads then sleep instead of spinning while OpenBLAS's threads run). --ranks R > 1
runs R processes (T threads each) with DistributedDataParallel over the gloo backend, the
global batch split evenly, and reports the global tokens/s and the peak RSS of the largest rank.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

SHAPES = {  # those of bench/bench.c
    "quick": dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, d_ff=512, vocab_size=4096,
                  seq_len=256, batch=16),
    "paper-small": dict(n_layers=6, d_model=1024, n_heads=8, n_kv_heads=8, d_ff=2048,
                        vocab_size=4096, seq_len=256, batch=8),
}
KINDS = ("dense", "btx", "bam", "bam-shared-kv")
EXPERTS, FFN_TOP_K = 4, 1
LB_COEF, Z_COEF = 0.01, 0.001
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
NORM_EPS, ROPE_BASE, INIT_STD = 1e-5, 10000.0, 0.02


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="all", choices=("all",) + tuple(SHAPES))
    ap.add_argument("--kind", default="all", choices=("all",) + KINDS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--params-only", action="store_true",
                    help="build each model and print its parameter count and FLOPs, no timing")
    ap.add_argument("--foreach", type=int, default=0, choices=(0, 1),
                    help="AdamW(foreach=...): 1 = the multi-tensor implementation (default 0: "
                         "the per-tensor loop, measured faster on this CPU build)")
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)  # worker of --ranks
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.threads < 1 or a.ranks < 1:
        ap.error("--steps >= 1, --warmup >= 0, --threads >= 1, --ranks >= 1")
    return a


ARGS = parse_args(sys.argv[1:])
# Before torch loads OpenBLAS and OpenMP: their pools read these once.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
# torch's OpenMP pool and OpenBLAS's pthread pool take turns on the same cores: idle OpenMP
# threads that spin steal them from the GEMMs (measured here: up to 2x slower at 2 threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ---- FLOPs: docs/method.md section 5, as bam_model_flops_per_token and
# ---- bam_mixture_flops_per_token (src/model/layout.c, src/model/mixture_layout.c) count them.
def flops_per_token(kind, s, T):
    """Forward FLOPs per token: a (out, in) matmul costs 2 in out; attention scores and values
    2 T d per layer (the causal average); only the experts a token uses; plus the head."""
    d, f, V, L = s["d_model"], s["d_ff"], s["vocab_size"], s["n_layers"]
    kvd = s["n_kv_heads"] * (d // s["n_heads"])
    q_att_o = 2 * d * d + 2 * T * d + 2 * d * d
    kv = 2 * d * 2 * kvd
    if kind == "dense":
        return L * (q_att_o + kv + 3 * 2 * d * f) + 2 * d * V
    if kind == "btx":
        att = q_att_o + kv
    else:
        Ea = EXPERTS
        att = Ea * q_att_o + (Ea if kind == "bam" else 1) * kv + 2 * Ea * d
    ffn = 2 * EXPERTS * d + FFN_TOP_K * 3 * 2 * d * f
    return L * (att + ffn) + 2 * d * V


def peak_rss_mib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


# ---- the model ----
def rope_tables(T, hd):
    """cos, sin (T, hd): rotate-half RoPE, angle(p, i) = p base^(-2i/hd), i < hd/2, each half
    of a head's dimensions uses the same angles."""
    inv = ROPE_BASE ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2.0 / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def rope(x, cos, sin):
    """x (B, T, ..., hd); cos, sin (T, 1.., hd) broadcast over the heads."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_softmax_av(q, k, v, mask):
    """softmax(q k^T + causal) v over the last two dims; q already scaled by 1/sqrt(hd)."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.masked_fill_(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Block(nn.Module):
    """y = x + Attn(LN(x)) + FFN(LN(x)), scale-only LayerNorm; attention dense (dense, BTX)
    or the soft mixture of Ea experts (BAM: own K/V; shared-KV: one K/V); FFN dense (dense)
    or top-k of Ef SwiGLU experts."""

    def __init__(self, kind, s):
        super().__init__()
        d, f = s["d_model"], s["d_ff"]
        self.kind, self.d, self.f = kind, d, f
        self.H, self.Hkv = s["n_heads"], s["n_kv_heads"]
        self.hd = d // self.H
        self.kvd = self.Hkv * self.hd
        E = EXPERTS
        self.ln = nn.Parameter(torch.ones(d))
        if kind in ("dense", "btx"):
            self.wqkv = nn.Parameter(torch.empty(d + 2 * self.kvd, d))
            self.wo = nn.Parameter(torch.empty(d, d))
        else:
            self.att_router = nn.Parameter(torch.empty(E, d))
            rows = E * (d + 2 * self.kvd) if kind == "bam" else E * d + 2 * self.kvd
            self.wqkv = nn.Parameter(torch.empty(rows, d))  # every expert's Q (K, V) stacked
            self.wo = nn.Parameter(torch.empty(d, E * d))    # [Wo_1 ... Wo_E]
        if kind == "dense":
            self.w_gate_up = nn.Parameter(torch.empty(2 * f, d))
            self.w_down = nn.Parameter(torch.empty(d, f))
        else:
            self.ffn_router = nn.Parameter(torch.empty(E, d))
            # one Parameter per expert: slicing an (E, ...) Parameter would make autograd
            # scatter each expert's gradient into a zero tensor of the whole stack
            self.w_gate_up = nn.ParameterList(nn.Parameter(torch.empty(2 * f, d)) for _ in range(E))
            self.w_down = nn.ParameterList(nn.Parameter(torch.empty(d, f)) for _ in range(E))

    # -- attention --
    def _heads(self, x, n):  # (B, T, n*hd) -> (B, n, T, hd)
        B, T, _ = x.shape
        return x.view(B, T, n, self.hd).transpose(1, 2)

    def _gqa(self, k):  # (..., Hkv, T, hd) -> (..., H, T, hd)
        g = self.H // self.Hkv
        return k if g == 1 else k.repeat_interleave(g, dim=-3)

    def attention(self, h, cos, sin, mask):
        B, T, d = h.shape
        H, Hkv, hd, kvd, E = self.H, self.Hkv, self.hd, self.kvd, EXPERTS
        scale = hd ** -0.5
        qkv = F.linear(h, self.wqkv)
        if self.kind in ("dense", "btx"):
            q, k, v = qkv.split([d, kvd, kvd], dim=-1)
            c, s_ = cos[:, None, :], sin[:, None, :]
            q = rope(q.view(B, T, H, hd), c, s_).transpose(1, 2) * scale
            k = rope(k.view(B, T, Hkv, hd), c, s_).transpose(1, 2)
            y = causal_softmax_av(q, self._gqa(k), self._gqa(self._heads(v, Hkv)), mask)
            return F.linear(y.transpose(1, 2).reshape(B, T, d), self.wo)
        g = torch.softmax(F.linear(h, self.att_router), dim=-1)  # (B, T, E), soft routing
        c4, s4 = cos[:, None, None, :], sin[:, None, None, :]
        if self.kind == "bam":  # E experts with their own Q, K, V: batch (B, E, H)
            qkv = qkv.view(B, T, E, d + 2 * kvd)
            q, k, v = qkv.split([d, kvd, kvd], dim=-1)
            q = rope(q.reshape(B, T, E, H, hd), c4, s4).permute(0, 2, 3, 1, 4) * scale
            k = rope(k.reshape(B, T, E, Hkv, hd), c4, s4).permute(0, 2, 3, 1, 4)
            v = v.reshape(B, T, E, Hkv, hd).permute(0, 2, 3, 1, 4)
            y = causal_softmax_av(q, self._gqa(k), self._gqa(v), mask)  # (B, E, H, T, hd)
            y = y.permute(0, 3, 1, 2, 4)                                # (B, T, E, H, hd)
        else:  # shared K/V: the one K, V broadcast over the experts' batch (B, E, H)
            q, k, v = qkv.split([E * d, kvd, kvd], dim=-1)
            q = rope(q.view(B, T, E, H, hd), c4, s4).permute(0, 2, 3, 1, 4) * scale
            k = rope(k.view(B, T, Hkv, hd), cos[:, None, :], sin[:, None, :]).transpose(1, 2)
            v = self._heads(v, Hkv)
            y = causal_softmax_av(q, self._gqa(k)[:, None], self._gqa(v)[:, None], mask)
            y = y.permute(0, 3, 1, 2, 4)                                # (B, T, E, H, hd)
        # sum_j g_j (y_j Wo_j^T) = [g_1 y_1, ..., g_E y_E] [Wo_1 ... Wo_E]^T: one GEMM
        y = (y * g[..., None, None]).reshape(B, T, E * d)
        return F.linear(y, self.wo)

    # -- FFN --
    def ffn(self, h):
        B, T, d = h.shape
        f = self.f
        if self.kind == "dense":
            gate, up = F.linear(h, self.w_gate_up).split([f, f], dim=-1)
            return F.linear(F.silu(gate) * up, self.w_down), None
        E, k = EXPERTS, FFN_TOP_K
        hf = h.reshape(B * T, d)
        logits = F.linear(hf, self.ffn_router)                    # (N, E)
        p = torch.softmax(logits, dim=-1)
        top_p, top_i = p.topk(k, dim=-1)                          # gates p_i: no renormalisation
        flat_i = top_i.reshape(-1)
        order = torch.argsort(flat_i)
        token = order // k                                        # assignment -> its token
        counts = torch.bincount(flat_i, minlength=E).tolist()
        xs = hf.index_select(0, token).split(counts)
        ys = []
        for e in range(E):
            gate, up = F.linear(xs[e], self.w_gate_up[e]).split([f, f], dim=-1)
            ys.append(F.linear(F.silu(gate) * up, self.w_down[e]))
        y = torch.cat(ys) * top_p.reshape(-1)[order, None]
        out = torch.zeros_like(hf).index_add_(0, token, y)
        # auxiliary losses: per-sequence load balancing (f_i a constant) and the z-loss
        with torch.no_grad():
            f_i = F.one_hot(top_i.view(B, T * k), E).sum(dim=1).float() / (T * k)  # (B, E)
        P_i = p.view(B, T, E).mean(dim=1)
        lb = E * (f_i * P_i).sum(dim=-1).mean()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return out.view(B, T, d), LB_COEF * lb + Z_COEF * z

    def forward(self, x, cos, sin, mask):
        h = F.layer_norm(x, (self.d,), self.ln, None, NORM_EPS)
        m, aux = self.ffn(h)
        return x + self.attention(h, cos, sin, mask) + m, aux


class Model(nn.Module):
    def __init__(self, kind, s):
        super().__init__()
        d, V = s["d_model"], s["vocab_size"]
        self.d = d
        self.wte = nn.Parameter(torch.empty(V, d))
        self.blocks = nn.ModuleList(Block(kind, s) for _ in range(s["n_layers"]))
        self.ln_f = nn.Parameter(torch.ones(d))
        self.w_head = nn.Parameter(torch.empty(V, d))  # untied
        T, hd = s["seq_len"], d // s["n_heads"]
        # constants, not module state (DDP would broadcast buffers, and gloo has no bool)
        self.cos, self.sin = rope_tables(T, hd)
        self.mask = torch.ones(T, T, dtype=torch.bool).triu(1)  # True above the diagonal
        with torch.no_grad():
            for name, prm in self.named_parameters():
                if prm.dim() >= 2:
                    prm.normal_(0.0, INIT_STD)

    def forward(self, tokens, targets):
        x = F.embedding(tokens, self.wte)
        aux_total = 0.0
        for blk in self.blocks:
            x, aux = blk(x, self.cos, self.sin, self.mask)
            if aux is not None:
                aux_total = aux_total + aux
        x = F.layer_norm(x, (self.d,), self.ln_f, None, NORM_EPS)
        logits = F.linear(x, self.w_head)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1)) + aux_total


def param_groups(model):
    """Weight decay on matrices; none on norms and routers (as bam's tensor table)."""
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if prm.dim() < 2 or leaf in ("att_router", "ffn_router") else decay).append(prm)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def run_case(kind, shape_name, args, rank=0, world=1):
    s = SHAPES[shape_name]
    T, B = s["seq_len"], s["batch"]
    if B % world:
        raise SystemExit(f"batch {B} is not divisible by {world} ranks")
    local_B = B // world
    torch.manual_seed(1)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = Model(kind, s)
    count = n_params(model)
    fpt = flops_per_token(kind, s, T)
    if args.params_only:
        return {"kind": kind, "shape": shape_name, "params": count,
                "flops_per_token_forward": fpt}
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                  gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WEIGHT_DECAY, foreach=bool(args.foreach))
    gen = torch.Generator().manual_seed(5 + rank)
    x = torch.randint(0, s["vocab_size"], (local_B, T), generator=gen)
    y = torch.randint(0, s["vocab_size"], (local_B, T), generator=gen)
    params = list(model.parameters())
    times = []
    for r in range(-args.warmup, args.steps):
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = net(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        dt = time.perf_counter() - t0
        if world > 1:  # the step is as slow as the slowest rank
            t = torch.tensor([dt], dtype=torch.float64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            dt = float(t)
        if r >= 0:
            times.append(dt)
        if not torch.isfinite(loss):
            raise SystemExit(f"{kind} {shape_name}: loss {float(loss)}")
    step_s = statistics.median(times)
    rss = peak_rss_mib()
    if world > 1:
        t = torch.tensor([rss], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        rss = float(t)
    tokens = B * T
    return {"kind": kind, "shape": shape_name, "impl": "torch", "torch": torch.__version__,
            "ranks": world, "threads": args.threads, "batch": B, "seq_len": T,
            "experts": 1 if kind == "dense" else EXPERTS, "params": count,
            "steps": args.steps, "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s, 1),
            "model_gflops": round(3.0 * fpt * tokens / step_s / 1e9, 2),
            "peak_rss_mib": round(rss), "blas": blas_kernels()}


def blas_kernels():
    """The kernels the BLAS torch loaded runs ("Haswell", "Cooperlake", ...) when it is an
    OpenBLAS (Debian's libblas.so.3 alternatives are), else "not OpenBLAS (its file name)"."""
    import ctypes
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if "libblas" in line or "openblas" in line})
    for path in libs:
        try:
            fn = ctypes.CDLL(path).openblas_get_corename
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_char_p
        return fn().decode()
    return f"not OpenBLAS ({os.path.basename(libs[0])})" if libs else "not OpenBLAS (unknown)"


def cases(args):
    shapes = SHAPES if args.shape == "all" else [args.shape]
    kinds = KINDS if args.kind == "all" else [args.kind]
    return [(k, sh) for sh in shapes for k in kinds]


def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def main():
    args = ARGS
    torch.set_num_threads(args.threads)
    if args.ranks > 1 and args.rank < 0:
        if args.params_only:
            raise SystemExit("--params-only runs on one rank")
        if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
            for kind, shape in cases(args):  # a null figure with the reason
                print(json.dumps({"kind": kind, "shape": shape, "ranks": args.ranks,
                                  "tokens_per_s": None,
                                  "error": "torch.distributed with gloo is not available"}))
            return 0
        # One launch per case, R worker processes each (like one torchrun per case).
        for kind, shape in cases(args):
            port = free_port()
            base = [sys.executable, os.path.abspath(__file__), "--shape", shape, "--kind", kind,
                    "--threads", str(args.threads), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--ranks", str(args.ranks),
                    "--foreach", str(args.foreach), "--port", str(port)]
            procs = [subprocess.Popen(base + ["--rank", str(r)]) for r in range(args.ranks)]
            rcs = [p.wait() for p in procs]
            if any(rcs):
                print(f"torch_bench: {kind} {shape}: a rank failed ({rcs})", file=sys.stderr)
                return 1
        return 0
    if args.rank >= 0:  # a worker of --ranks R
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        torch.distributed.init_process_group("gloo", rank=args.rank, world_size=args.ranks)
        for kind, shape in cases(args):
            res = run_case(kind, shape, args, args.rank, args.ranks)
            if args.rank == 0:
                print(json.dumps(res), flush=True)
        torch.distributed.destroy_process_group()
        return 0
    for kind, shape in cases(args):
        print(json.dumps(run_case(kind, shape, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
