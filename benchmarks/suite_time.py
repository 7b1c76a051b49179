"""Is the test suite slower than before? The tests both trees hold, timed in each, alternately.

    python benchmarks/suite_time.py --old /path/to/old/checkout [--repeats 2]

The suite grows with features, so its total time says little about whether a refactor slowed it. This
collects the test ids of this tree and of ``--old`` (e.g. ``git worktree add /tmp/old d330607``), keeps
the ids both hold, and runs exactly those with each tree's code (``PYTHONPATH`` = that tree), old and
new alternately, ``--repeats`` times each. It also times this tree's whole suite once. Reports the
median wall seconds and the ratio. Writes ``benchmarks/results/suite_time.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, header, markdown_table, write_result  # noqa: E402


def _env(tree: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree))


def collect(tree: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=tree, env=_env(tree), capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if "::" in line}


def timed_run(tree: Path, ids_file: Path | None) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if ids_file is not None:
        cmd += ["@" + str(ids_file)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    return wall, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="checkout of the older tree")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    new, old = ROOT, args.old.resolve()
    shared = sorted(collect(new) & collect(old))
    if not shared:
        sys.exit("suite_time: the two trees share no test ids; check --old")
    ids = Path(tempfile.mkdtemp()) / "ids.txt"
    ids.write_text("\n".join(shared) + "\n")
    rows, walls = [], {"old": [], "new": []}
    for rep in range(args.repeats):
        for label, tree in (("old", old), ("new", new)):
            wall, summary = timed_run(tree, ids)
            walls[label].append(wall)
            rows.append([rep + 1, label, f"{wall:.1f}", summary, f"{os.getloadavg()[0]:.1f}"])
            print(rows[-1], flush=True)
    whole, whole_summary = timed_run(new, None)
    o, n = statistics.median(walls["old"]), statistics.median(walls["new"])
    md = header("Test suite time: the tests both trees hold, old code vs this tree")
    md += (f"{len(shared)} test ids held by both trees (`--old {old}`), run with each tree's code, alternately. "
           "Load = 1-minute load average after the run (2 cores).\n\n")
    md += markdown_table(["repeat", "tree", "wall s", "pytest summary", "load"], rows)
    md += (f"\n\nMedian: old {o:.1f} s, this tree {n:.1f} s: ratio {n / o:.2f} (below 1: this tree is faster).\n"
           f"This tree's whole suite, once: {whole:.1f} s ({whole_summary}).\n")
    write_result("suite_time", md)


if __name__ == "__main__":
    main()
