"""Compress time, old code against new, side by side: issue 17's compress-time targets.

Three cases, each compressed by the ordinary CLI (``python -m onnx_lowrank compress``) in a subprocess, once
with this tree on PYTHONPATH and once with an older tree (``--old``, default the code before issue 17's work,
d330607), alternately, ``--repeats`` times; the table gives medians.

- ``rec``: PP-OCRv4 recogniser (rapidocr-onnxruntime 1.4.4), defaults (nonlinear, asymmetric), ``--speedup
  1.5 --objective flops --rank-multiple 1`` (the setting of the 121 s in benchmarks/ppocr_rec.py: ranks do not
  depend on timings), 300 calibration lines (seed 1); accuracy = CER without spaces on 300 held-out lines
  (seed 2), helpers of benchmarks/ppocr_rec.py. Target: at most 30 s of solve, CER no worse.
- ``minilm``: all-MiniLM-L6-v2 exported by benchmarks/minilm.py, defaults (schedule 25:0.01,25:1, samples per
  image auto), ``--speedup 1.5 --objective flops``; accuracy = mean cosine of the embeddings against the
  original on the 256 evaluation sentences (benchmarks/minilm.py). Target: compress in under 2 minutes.
- ``vgg19``: light VGG-19 (random He weights, benchmarks/light_models.py), defaults, ``--speedup 3
  --objective flops --rank-multiple 1``, ``--vgg-images`` random normal inputs (random weights: real
  photos add nothing); accuracy = output NMSE and top-1 agreement against the original on 16 other inputs.
  Target: not slower than the old code.

Per run: the phase lines the CLI writes to a non-terminal stderr (``NAME: done, N unit in S s``; the new code
also writes one line per solved layer, whose elapsed times give per-layer seconds), total wall, ``uptime``'s
load average at the start. Timing: hold the lock.

    flock /tmp/timing.lock python benchmarks/compress_time.py --repeats 2
    python benchmarks/compress_time.py --cases rec --repeats 1 --old ''     # new code only
    flock /tmp/timing.lock python benchmarks/compress_time.py --cases rec --profile   # where the solve goes

Writes ``benchmarks/results/compress_time.md`` and ``.json``; work files in ``.cache/compress_time/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

WORK = common.CACHE / "compress_time"
PHASE = re.compile(r"^(?P<phase>[^:\n]+): done, (?P<n>\d+) (?P<unit>\w+) in (?P<s>[\d.]+) s", re.M)
LAYER = re.compile(r"^asymmetric solve: layer (?P<k>\d+) of (?P<n>\d+) \((?P<name>[^,]+), (?P<d>\d+) -> "
                   r"(?P<rank>\d+)\), (?P<s>[\d.]+) s", re.M)


def load() -> str:
    return os.getloadavg().__repr__()


# ---------------------------------------------------------------------------------------- cases
class Rec:
    name = "rec"
    label = "PP-OCRv4 recogniser, --speedup 1.5"
    metric = "CER (no spaces)"

    def __init__(self):
        import ppocr_rec

        self.mod = ppocr_rec
        self.model = ppocr_rec.package_dir() / ppocr_rec.MODEL_FILE
        self.chars = ppocr_rec.character_list(self.model)
        charset = set(self.chars[1:])
        self.calib = WORK / "rec_calib.npz"
        _, calib_x = ppocr_rec.make_lines(300, seed=1, charset=charset)
        np.savez(self.calib, x=calib_x)
        self.texts, self.eval_x = ppocr_rec.make_lines(300, seed=2, charset=charset)
        self.original = self.accuracy(self.model)

    def args(self) -> list[str]:
        # --factorise-head: the same layers as every earlier run of this case (the 6,625-wide classifier included;
        # since graph/heads.py automatic ranks keep it whole by default), so solve times stay comparable.
        return [str(self.model), "--calib", str(self.calib), "--speedup", "1.5", "--objective", "flops",
                "--rank-multiple", "1", "--no-measure", "--factorise-head"]

    def accuracy(self, path) -> float:
        return self.mod.model_cer(path, self.eval_x, self.texts, self.chars)


class MiniLM:
    name = "minilm"
    label = "MiniLM (all-MiniLM-L6-v2), --speedup 1.5"
    metric = "mean cosine"

    def __init__(self):
        import minilm

        self.mod = minilm
        self.model = minilm.export()  # needs torch + transformers the first time (benchmarks/requirements.txt)
        self.calib, eval_path = minilm.make_data()
        with np.load(eval_path) as z:
            self.feeds = {k: z[k] for k in minilm.INPUTS}
        self.reference = minilm._run(self.model, self.feeds)
        self.original = 1.0

    def args(self) -> list[str]:
        return [str(self.model), "--calib", str(self.calib), "--speedup", "1.5", "--objective", "flops",
                "--no-measure"]

    def accuracy(self, path) -> float:
        return self.mod.compare(self.reference, self.mod._run(path, self.feeds))["cosine_mean"]


class VGG19:
    name = "vgg19"
    label = "light VGG-19, --speedup 3"
    metric = "output NMSE / top-1 agreement"

    def __init__(self, images: int):
        import light_models

        self.images = images
        self.label = f"light VGG-19, --speedup 3, {images} images"
        self.model = light_models.materialise("vgg19")
        self.calib = WORK / f"vgg19_calib{images}.npz"
        if not self.calib.exists():
            np.savez(self.calib, data_0=_normal(images, seed=1000))
        self.x = _normal(16, seed=77)
        self.ref = self._out(self.model)
        self.original = (0.0, 1.0)

    def _out(self, path) -> np.ndarray:
        from onnx_lowrank import runtime

        sess = runtime.session(path, runtime.TIMING)
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: self.x[i:i + 1]})[0] for i in range(len(self.x))])  # batch 1 model

    def args(self) -> list[str]:
        return [str(self.model), "--calib", str(self.calib), "--speedup", "3", "--objective", "flops",
                "--rank-multiple", "1", "--no-measure"]

    def accuracy(self, path) -> tuple[float, float]:
        out = self._out(path)
        nmse = float(((out - self.ref) ** 2).sum() / (self.ref ** 2).sum())
        return nmse, float((out.argmax(-1) == self.ref.argmax(-1)).mean())


def _normal(n: int, seed: int) -> np.ndarray:
    """Random 224 x 224 inputs (standard normal, like normalised pixels): random weights need no real images."""
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)


# ---------------------------------------------------------------------------------------- runs
def compress(case, tree: str, tag: str, timeout: float) -> dict:
    """One CLI compress with ``tree`` on PYTHONPATH: wall, phases, per-layer solve seconds, accuracy."""
    out = WORK / f"{case.name}.{tag}.onnx"
    report = WORK / f"{case.name}.{tag}.report.json"
    for p in (out, report):
        p.unlink(missing_ok=True)
    # cwd = the tree too: ``python -m`` puts the working directory ahead of PYTHONPATH
    env = dict(os.environ, PYTHONPATH=tree)
    where = subprocess.run([sys.executable, "-c", "import onnx_lowrank; print(onnx_lowrank.__file__)"], env=env,
                           cwd=tree, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(Path(tree).resolve())):
        raise SystemExit(f"{tree}: python imports onnx_lowrank from {where}")
    cmd = [sys.executable, "-m", "onnx_lowrank", "compress", *case.args(), "-o", str(out), "--report", str(report)]
    row = {"case": case.name, "tree": tree, "tag": tag, "load": load(), "module": where}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=timeout)
        row["rc"], err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as exc:
        row["rc"], err = "timeout", (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
    row["wall_s"] = time.perf_counter() - t0
    (WORK / f"{case.name}.{tag}.stderr.txt").write_text(err)
    row["phases"] = {m["phase"]: float(m["s"]) for m in PHASE.finditer(err)}
    prev, layers = 0.0, []
    for m in LAYER.finditer(err):
        layers.append({"name": m["name"], "d": int(m["d"]), "rank": int(m["rank"]), "s": float(m["s"]) - prev})
        prev = float(m["s"])
    row["layers"] = layers
    row["solve_s"] = row["phases"].get("asymmetric solve", row["phases"].get("solve"))
    if row["rc"] == 0 and out.exists():
        row["accuracy"] = case.accuracy(out)
    else:
        row["error"] = err.strip().splitlines()[-1] if err.strip() else "no output"
    print(f"{case.name} {tag}: rc {row['rc']} wall {row['wall_s']:.1f} s solve {row['solve_s']} s "
          f"accuracy {row.get('accuracy')} load {row['load']}", flush=True)
    return row


def median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None and r["rc"] == 0]
    return statistics.median(vals) if vals else None


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (tuple, list)):
        return " / ".join(fmt(x) for x in v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write(cases, rows: list[dict], args) -> None:
    versus = f"against {_commit(args.old)}" if args.old else "alone"
    md = common.header(f"Compress time ({', '.join(c.name for c in cases)}): this tree {_commit(str(common.ROOT))} {versus}")
    md += (f"Old = `{args.old}` (`git -C {args.old} log -1 --format=%h`: {_commit(args.old)}), new = this tree "
           f"({_commit(str(common.ROOT))}). Each case compressed by the CLI in a subprocess, old and new alternately, "
           f"{args.repeats} repeat(s); medians over the runs that finished. `solve` = the CLI's own `asymmetric "
           "solve: done ... in S s` line; wall = the whole CLI process (load, calibration, solve, rewrite, save). "
           "Load = `os.getloadavg()` when each run started.\n\n")
    table = []
    for case in cases:
        for tree, label in ((args.old, "old"), (str(common.ROOT), "new")):
            rs = [r for r in rows if r["case"] == case.name and r["tree"] == tree]
            if not rs:
                continue
            ok = [r for r in rs if r["rc"] == 0]
            table.append([case.label, label, f"{len(ok)} of {len(rs)}",
                          fmt(median(rs, "solve_s")), fmt(median(rs, "wall_s")),
                          fmt(ok[0]["phases"].get("calibration")) if ok else "-",
                          fmt(ok[0].get("accuracy")) if ok else "; ".join(str(r.get("error", r["rc"])) for r in rs),
                          fmt(case.original), "; ".join(r["load"] for r in rs)])
    md += common.markdown_table(["case", "code", "finished", "solve s (median)", "wall s (median)",
                                 "calibration s (first)", "accuracy", "original", "load at start"], table)
    md += "\n\nAll runs (phase seconds as the CLI logged them):\n\n"
    md += common.markdown_table(["case", "code", "rc", "wall s", "phases", "load"],
                                [[r["case"], r["tag"], r["rc"], fmt(r["wall_s"]),
                                  ", ".join(f"{k} {v:g}" for k, v in r["phases"].items()), r["load"]] for r in rows])
    new = [r for r in rows if r["tree"] == str(common.ROOT) and r["layers"]]
    for case in cases:
        last = [r for r in new if r["case"] == case.name]
        if last:
            md += f"\n\nPer-layer solve seconds, {case.label}, new code (last run):\n\n"
            md += common.markdown_table(["layer", "d -> rank", "s"],
                                        [[x["name"], f"{x['d']} -> {x['rank']}", fmt(x["s"])] for x in last[-1]["layers"]])
    common.write_result(args.name, md)
    (common.RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1, default=str))


def profile(case, stem: str | None = None, top: int = 25) -> None:
    """One compress of ``case`` with this tree, in this process, with timers around the solve's parts
    (z-step per activation kind, linear fits, eigendecompositions, the nonlinear loop, propagation) and
    cProfile; writes ``benchmarks/results/<stem>.md`` (default ``compress_time_profile_<case>``)."""
    import cProfile
    import io
    import pstats
    from collections import defaultdict

    import onnx_lowrank.calibration.sampling as sampling
    import onnx_lowrank.solve as sv
    import onnx_lowrank.solver.layer as layer
    import onnx_lowrank.solver.nonlinear as nl
    import onnx_lowrank.solver.reconstruction as rec
    from onnx_lowrank.cli import main as cli

    t: dict[str, float] = defaultdict(float)

    def timed(owner, attr, key, by_kind: bool = False):
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t[f"{key} {a[3].kind}" if by_kind else key] += time.perf_counter() - t0
        setattr(owner, attr, wrapper)

    timed(sv, "_solve_asymmetric", "asymmetric solve (phase)")
    timed(sv, "_solve", "per-layer solves")
    timed(sampling.Propagator, "transform", "propagation: transform of the cached maps")
    timed(layer, "linear_reconstruction", "linear fits (PCA / regression)")
    timed(layer, "nonlinear_reconstruction", "nonlinear fits")
    timed(nl, "_z_solve", "z-step", by_kind=True)
    timed(rec, "_top_eigvecs", "eigendecompositions (top eigenvectors)")
    out = WORK / f"{case.name}.profile.onnx"
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        cli.main(["compress", *case.args(), "-o", str(out), "-q"], standalone_mode=False)
    finally:
        prof.disable()
    wall = time.perf_counter() - t0
    phase = t["asymmetric solve (phase)"]
    zs = sum(v for k, v in t.items() if k.startswith("z-step"))
    rows = [[k, f"{v:.1f}", f"{100 * v / phase:.0f} %"] for k, v in sorted(t.items())]
    rows.append(["propagation: onnxruntime segments, sampling (phase - per-layer solves - transform)",
                 f"{phase - t['per-layer solves'] - t['propagation: transform of the cached maps']:.1f}", ""])
    rows.append(["nonlinear fits without the z-step", f"{t['nonlinear fits'] - zs:.1f}",
                 f"{100 * (t['nonlinear fits'] - zs) / phase:.0f} %"])
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    md = common.header(f"Where the solve goes: {case.label} (this tree {_commit(str(common.ROOT))}, cProfile on)")
    md += (f"Whole compress {wall:.1f} s under cProfile (load at start {load()}); percentages of the asymmetric "
           f"solve phase. Timers nest: the z-step is inside the nonlinear fits, eigendecompositions inside "
           f"both kinds of fit, all of them inside the per-layer solves.\n\n")
    md += common.markdown_table(["part", "seconds", "of the solve"], rows)
    md += "\n\ncProfile, top by own time:\n\n```\n" + "\n".join(
        line[:160] for line in s.getvalue().strip().splitlines()[-top - 2:]) + "\n```\n"
    md += f"\naccuracy of this run: {fmt(case.accuracy(out))} ({case.metric}; original {fmt(case.original)})\n"
    common.write_result(stem or f"compress_time_profile_{case.name}", md)


def _commit(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="rec,minilm,vgg19")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--old", default="/work/wt/act-base", help="older tree to compare with ('' = none)")
    ap.add_argument("--vgg-images", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped (counted as not finished)")
    ap.add_argument("--minilm-old-timeout", type=float, default=300, help="the old code on MiniLM: issue 17 "
                    "saw it not finish in 5 minutes")
    ap.add_argument("--name", default="compress_time", help="result file stem in benchmarks/results")
    ap.add_argument("--profile", action="store_true", help="instead: one timed and profiled compress per case "
                    "with this tree (results/compress_time_profile_<case>.md, or <name>_<case>.md with --name)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in args.cases.split(","):
        try:
            cases.append({"rec": Rec, "minilm": MiniLM, "vgg19": lambda: VGG19(args.vgg_images)}[name]())
        except ImportError as exc:
            print(f"skip {name}: {exc}", flush=True)
    if args.profile:
        for case in cases:
            profile(case, None if args.name == "compress_time" else f"{args.name}_{case.name}")
        return
    trees = [t for t in (args.old, str(common.ROOT)) if t]
    rows = []
    for case in cases:
        for i in range(args.repeats):
            for tree in trees:
                old = tree == args.old
                limit = args.minilm_old_timeout if old and case.name == "minilm" else args.timeout
                rows.append(compress(case, tree, f"{'old' if old else 'new'}{i}", limit))
                write(cases, rows, args)


if __name__ == "__main__":
    main()
