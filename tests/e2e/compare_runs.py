#!/usr/bin/env python3
"""Compares two training runs of the same model and data on different rank layouts.

    compare_runs.py losses A/metrics.csv B/metrics.csv ROWS [--tol T] [--step1-tol T1]
    compare_runs.py eval A/eval.csv B/eval.csv [--tol T]

losses: both files have ROWS rows; the first step's loss and gradient norm agree to
--step1-tol (relative, default 1e-5) and every step's loss to --tol (default 1e-5).
eval: the last evaluation covers the same domains with the same token counts and its
losses agree to --tol. Prints the worst differences; exits 1 when a check fails.

Why two tolerances. At the first step every layout starts from the same parameters and
data, so its loss and gradient norm differ by float rounding alone: that is where a wrong
reduction, a lost expert gradient or a misrouted token shows. From then on the parameters
differ by rounding too, and a top-k router turns a rounding difference into a different
expert for any token whose two best scores tie to within it; one such token moves a
tiny model's loss by about 1e-5 and the trajectories then drift apart. Runs with top-k
routing therefore compare the later steps to a looser --tol; runs whose routing is
continuous (soft, or every expert kept) keep 1e-5 throughout (tests/e2e/*.sh).
"""
import argparse
import csv
import sys


def rel(x, y):
    return abs(x - y) / max(abs(y), 1e-30)


def losses(a_path, b_path, rows, tol, step1_tol):
    a = list(csv.DictReader(open(a_path)))
    b = list(csv.DictReader(open(b_path)))
    if len(a) != rows or len(b) != rows:
        print(f"     {len(a)} and {len(b)} rows, expected {rows}")
        return False
    la = [float(r["loss"]) for r in a]
    lb = [float(r["loss"]) for r in b]
    s1 = max(rel(la[0], lb[0]), rel(float(a[0]["grad_norm"]), float(b[0]["grad_norm"])))
    diffs = [rel(x, y) for x, y in zip(la, lb)]
    worst = max(diffs)
    at = diffs.index(worst) + 1
    print(f"     loss {la[0]:.4f} -> {la[-1]:.4f}; step 1 (loss, gradient norm) relative "
          f"difference {s1:.1e}; worst over {rows} steps {worst:.1e} (step {at})")
    return s1 <= step1_tol and worst <= tol


def final_eval(path):
    rows = list(csv.DictReader(open(path)))
    last = max(int(r["step"]) for r in rows)
    return {r["domain"]: (float(r["loss"]), int(r["tokens"])) for r in rows if int(r["step"]) == last}


def evals(a_path, b_path, tol):
    a, b = final_eval(a_path), final_eval(b_path)
    if not b or a.keys() != b.keys() or any(a[d][1] != b[d][1] for d in b):
        print(f"     final evaluations differ in domains or tokens: {a} vs {b}")
        return False
    worst = max(rel(a[d][0], b[d][0]) for d in b)
    print(f"     final eval on {len(b)} domains; worst relative difference {worst:.1e}")
    return worst <= tol


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["losses", "eval"])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("rows", type=int, nargs="?")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--step1-tol", type=float, default=1e-5)
    o = p.parse_args()
    if o.what == "losses":
        if o.rows is None:
            p.error("losses needs ROWS")
        ok = losses(o.a, o.b, o.rows, o.tol, o.step1_tol)
    else:
        ok = evals(o.a, o.b, o.tol)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
