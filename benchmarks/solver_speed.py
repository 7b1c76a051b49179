"""z-step time and objective per activation kind, this tree against an older one on the same data.

    python benchmarks/solver_speed.py --old /path/to/old/checkout [--rows 8000 --cols 64 --repeats 5]

The old implementation is loaded from ``OLD/onnx_lowrank/solver/activations.py`` (the single
module of d330607 and before) under another name, so both run in one process, interleaved. Data
as in the solver's iterations: ``a = r(y)`` for pre-activations ``y``, ``u = y`` plus noise (the
current linear prediction) and a warm start ``z0`` near the answer, at the default schedule's two
penalties. Writes ``benchmarks/results/solver_speed.md`` (and prints it): median seconds per call,
the ratio, and the summed objective of each with their relative difference (positive: the new one
is worse).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import common  # noqa: E402

from onnx_lowrank.solver.activations import Activation, z_objective, z_step  # noqa: E402
from onnx_lowrank.solver.nonlinear import STOP_TOL  # noqa: E402

CASES = {
    "relu": ("relu", {}), "relu6": ("clip", {"min": 0.0, "max": 6.0}), "leaky_relu": ("leaky_relu", {"alpha": 0.1}),
    "prelu": ("prelu", {"slope": "per-channel"}), "hardsigmoid": ("hardsigmoid", {}), "hardswish": ("hardswish", {}),
    "silu": ("silu", {}), "gelu": ("gelu", {}), "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    "sigmoid": ("sigmoid", {}), "tanh": ("tanh", {}),
}


def load_old(root: Path):
    spec = importlib.util.spec_from_file_location("old_activations", root / "onnx_lowrank/solver/activations.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_activations"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def data(rows: int, cols: int, seed: int):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, cols)  # channels of different spread
    shift = rng.normal(0.0, 1.0, cols)
    y = rng.standard_normal((rows, cols)) * scale + shift
    u = y + 0.3 * scale * rng.standard_normal((rows, cols))
    return y, u


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="checkout of the old tree (e.g. a git worktree of d330607)")
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(CASES))
    args = ap.parse_args()
    old = load_old(args.old)
    y, u = data(args.rows, args.cols, 0)
    load0 = os.getloadavg()
    lines = [common.header("z step per activation: this tree vs the single-module solver of d330607"),
             f"{args.rows} x {args.cols} elements per call (pre-activations y of 64 channels with different spread "
             "and offset; u = y + noise; a = r(y)); warm start z0 = the old solver's answer for a nearby u; median "
             f"of {args.repeats} calls each, old and new interleaved in one process. Objective = summed "
             "(a - r(z))^2 + lambda (z - u)^2 at each solver's z, evaluated in float64 with the exact r. "
             "The machine is shared with other jobs: absolute times are noisy, the ratios are side by side.\n",
             "| kind | lambda | old s | new s | speed-up | old objective | new objective | new vs old |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    worst = 0.0
    for name in args.kinds.split(","):
        kind, params = CASES[name]
        if params.get("slope") == "per-channel":
            params = {"slope": np.linspace(0.05, 0.3, args.cols)}
        new_act, old_act = Activation(kind, params), old.Activation(kind, params)
        a = new_act.apply(y)
        for lam in (0.01, 1.0):
            z0 = old.z_step(a, y + 0.5 * (u - y), lam, old_act)  # the previous iteration's answer
            z_step(a, u, lam, new_act, z0)  # first call builds tables / warms caches
            old.z_step(a, u, lam, old_act, z0)
            t_old, t_new = [], []
            for _ in range(args.repeats):
                z_old, t = timed(lambda: old.z_step(a, u, lam, old_act, z0), 1)
                t_old += t
                z_new, t = timed(lambda: z_step(a, u, lam, new_act, z0), 1)
                t_new += t
            f_old = float(old.z_objective(z_old, a, u, lam, old_act).sum())
            f_new = float(z_objective(z_new, a, u, lam, new_act).sum())
            rel = (f_new - f_old) / f_old
            worst = max(worst, rel)
            mo, mn = statistics.median(t_old), statistics.median(t_new)
            lines.append(f"| {name} | {lam:g} | {mo:.4f} | {mn:.4f} | {mo / mn:.1f}x | {f_old:.6g} | {f_new:.6g} | "
                         f"{100 * rel:+.4f} % |")
            print(lines[-1], flush=True)
    load1 = os.getloadavg()
    lines.append(f"\nLoad average (1, 5, 15 min) at the start: {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}; at the end: "
                 f"{load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f} (2 cores).")
    lines.append(f"\nWorst objective difference (new vs old): {100 * worst:+.4f} %. The outer iterations of the "
                 f"nonlinear solver now end a stage once an iteration improves the relaxed objective by less than "
                 f"{STOP_TOL:g} (relative).")
    print(lines[-1])
    if args.kinds == ",".join(CASES):
        (HERE / "results" / "solver_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
