"""One layer's solve, old tree against this one: MiniLM's first 1536-wide GELU feed-forward MatMul, or (``--case
rec``) the PP-OCRv4 recogniser's widest HardSwish layer (p2o.Conv.30, 480 -> 168, as benchmarks/compress_time.py's
rec case samples it).

The layer's sampled rows are taken from a real compress (benchmarks/minilm.py's model and calibration, defaults,
`--speedup 1.5 --objective flops`): the CLI runs in-process until that layer's solve, whose inputs are saved to
the cache. Then each tree solves them with `solve_layer` (one BLAS thread, as the CLI), in a subprocess with its
own PYTHONPATH, alternately; seconds and the held-back error as solve_layer reports it.

    flock /tmp/timing.lock python benchmarks/layer_time.py --old /path/to/old/tree --repeats 1 --name NAME
    flock /tmp/timing.lock python benchmarks/layer_time.py --case rec --old /path/to/old/tree --repeats 3 --name NAME
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

ROWS = common.CACHE / "layer_time" / "minilm_ffn0.npz"
REC_ROWS = common.CACHE / "layer_time" / "rec_conv30.npz"
REC_LAYER = "p2o.Conv.30"

SOLVE = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from onnx_lowrank.solver.activations import Activation
from onnx_lowrank.solver.layer import solve_layer
z = np.load(sys.argv[1])
act = Activation(str(z['kind']), json.loads(str(z['params'])))
with threadpool_limits(limits=1, user_api='blas'):
    t = time.perf_counter()
    extra = {k: z[k] for k in ('s', 'sh') if k in z.files}
    sol = solve_layer(z['y'], z['yh'], int(z['rank']), act, z['fit'], z['held'], **extra)
    s = time.perf_counter() - t
print(json.dumps({'seconds': s, 'rel_error': sol.rel_error, 'rel_error_linear': sol.rel_error_linear,
                  'method': sol.method}))
"""


def extract() -> None:
    """Run the MiniLM compress until its first layer at least 1536 wide; save that solve's inputs."""
    import numpy as np

    import minilm
    import onnx_lowrank.schemes.base as base
    from onnx_lowrank.cli import main as cli

    def stop(y, yh, rank, act, fit, held, **kw):
        if y.shape[1] < 1536:
            return original(y, yh, rank, act, fit, held, **kw)
        assert kw.get("s") is None and kw.get("sh") is None and yh is not None
        ROWS.parent.mkdir(parents=True, exist_ok=True)
        np.savez(ROWS, y=y, yh=yh, fit=fit, held=held, rank=rank, kind=act.kind,
                 params=json.dumps(dict(act.params)))
        raise SystemExit(0)

    original, base.solve_layer = base.solve_layer, stop
    model = minilm.export()
    calib, _ = minilm.make_data()
    try:
        cli.main(["compress", str(model), "--calib", str(calib), "--speedup", "1.5", "--objective", "flops",
                  "--no-measure", "-q", "-o", str(ROWS.with_suffix(".onnx"))], standalone_mode=False)
    except SystemExit:
        pass
    base.solve_layer = original


def extract_rec() -> None:
    """Run compress_time.py's recogniser compress until REC_LAYER's solve; save that solve's inputs."""
    import numpy as np

    import compress_time
    import onnx_lowrank.solve as sv
    from onnx_lowrank.cli import main as cli

    case = compress_time.Rec()

    def stop(p, original_, approximated, cfg, plain=None):
        if p.layer.name != REC_LAYER:
            return solve_(p, original_, approximated, cfg, plain)
        import onnx_lowrank.schemes.base as base

        def save(y, yh, rank, act, fit, held, **kw):
            REC_ROWS.parent.mkdir(parents=True, exist_ok=True)
            extra = {k: kw[k] for k in ("s", "sh") if kw.get(k) is not None}
            np.savez(REC_ROWS, y=y, yh=yh, fit=fit, held=held, rank=rank, kind=act.kind,
                     params=json.dumps(dict(act.params)), **extra)
            raise SystemExit(0)
        base.solve_layer = save
        solve_(p, original_, approximated, cfg, plain)

    solve_, sv._solve = sv._solve, stop
    try:
        cli.main(["compress", *case.args(), "-q", "-o", str(REC_ROWS.with_suffix(".onnx"))], standalone_mode=False)
    except SystemExit:
        pass
    sv._solve = solve_


def solve(tree: Path, rows: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, "-c", SOLVE, str(rows)], cwd=tree, env=env, capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--name", default="layer_time")
    ap.add_argument("--case", choices=("minilm", "rec"), default="minilm")
    args = ap.parse_args()
    rows_path = REC_ROWS if args.case == "rec" else ROWS
    if not rows_path.exists():
        extract_rec() if args.case == "rec" else extract()
    import numpy as np

    with np.load(rows_path) as z:
        shape, rank, fitted = z["y"].shape, int(z["rank"]), int(z["fit"].sum())
    rows, data = [], []
    for i in range(args.repeats):
        for label, tree in (("old", args.old.resolve()), ("new", common.ROOT)):
            load = os.getloadavg()
            r = solve(tree, rows_path)
            data.append({"code": label, "load": load, **r})
            rows.append([label, f"{r['seconds']:.1f}", f"{r['rel_error']:.6f}", f"{r['rel_error_linear']:.6f}",
                         r["method"], ", ".join(f"{v:.2f}" for v in load)])
    if args.case == "rec":
        md = common.header(f"One PP-OCRv4 recogniser layer's solve ({REC_LAYER}), old tree {_commit(args.old)} "
                           f"against this one {_commit(common.ROOT)}")
        what = (f"{REC_LAYER} of the PP-OCRv4 recogniser (HardSwish after it) as benchmarks/compress_time.py's rec "
                f"case samples it ({shape[0]} rows, {fitted} fitted, rank {rank}, asymmetric)")
    else:
        md = common.header("One MiniLM feed-forward layer's solve, old tree against this one")
        what = (f"the first 1536-wide GELU MatMul of all-MiniLM-L6-v2 as the default compress samples it ({shape[0]} "
                f"token rows, {fitted} fitted, rank {rank}, asymmetric)")
    md += (f"Old = `{args.old}`, new = this tree. Layer: {what}, solve_layer with defaults, one BLAS thread "
           "(as the CLI); held-back error = relative squared error after the activation on the held-back rows.\n\n")
    md += common.markdown_table(["code", "seconds", "held-back error", "linear fit's", "method", "load at start"],
                                rows)
    common.write_result(args.name, md)
    (common.RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))


def _commit(tree) -> str:
    p = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return p.stdout.strip() or "?"


if __name__ == "__main__":
    main()
