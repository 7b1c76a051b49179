"""Issue 14: what the optional Ray extra costs: installed size, `import ray` time, local cluster start-up.

onnx-lowrank imports Ray only for `--executor ray`; this measures what that costs when asked for.
Each figure is the median of ``--repeats`` fresh interpreters.

    python benchmarks/ray_cost.py [--repeats 5]

Writes benchmarks/results/ray_cost.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

IMPORT = "import time; t = time.perf_counter(); import ray; print(time.perf_counter() - t)"
START = ("import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False, "
         "log_to_driver=False); print(time.perf_counter() - t); ray.shutdown()")
BASE = "import time; t = time.perf_counter(); import onnx_lowrank.cli, onnx_lowrank.shards; print(time.perf_counter() - t)"


def seconds(code: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import ray
    from common import machine

    rows = []
    for what, code in (("import onnx_lowrank.cli + shards (no Ray)", BASE), ("import ray", IMPORT),
                       ("ray.init(num_cpus=2) of a local cluster", START)):
        runs = [seconds(code) for _ in range(args.repeats)]
        rows.append((what, statistics.median(runs), runs))
    lines = [
        "## The Ray extra: size and start-up (issue 14)",
        "",
        f"- command: `python benchmarks/ray_cost.py --repeats {args.repeats}`",
        f"- machine: {machine()} (shared with other jobs)",
        f"- date: {time.strftime('%Y-%m-%d')}",
        "",
        f"Ray {ray.__version__}, installed size {size_mb(Path(ray.__file__).parent):.0f} MB (the `ray` package folder; "
        "its dependencies are small and mostly shared). onnx-lowrank never imports it unless `--executor ray` "
        "is given.",
        "",
        "| what | median s | runs |",
        "|---|---|---|",
    ]
    for what, med, runs in rows:
        lines.append(f"| {what} | {med:.2f} | {', '.join(f'{r:.2f}' for r in runs)} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ray_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
