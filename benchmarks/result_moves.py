"""Evidence for re-recording tests/test_no_result_moves.py: its four compressions, old tree against this one.

Each (model, objective) of the test is compressed with the test's settings by both trees (subprocesses, each
tree its own PYTHONPATH and working directory), then scored against the original model on inputs the
compression did not see: the MNIST demo on its 1500 held-out digits (accuracy and top-1 agreement with the
original), the PP-OCRv4 recogniser on 30 other rendered lines (relative squared error of the output against
the original's, argmax agreement per time step).

    python benchmarks/result_moves.py --old /path/to/old/tree --name result_moves_mstep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import common  # noqa: E402

CHILD = """
import json, shutil, sys
sys.path.insert(0, 'tests')
import test_no_result_moves as t
name, objective, out, tmp = sys.argv[1:5]
table = None
if objective == 'latency':
    table = tmp + '/table.json'
    shutil.copy(t.DATA / f'{name}.latency.json', table)
from pathlib import Path
print(json.dumps(t.compress(name, objective, Path(out), Path(table) if table else None)))
"""


def compress(tree: Path, name: str, objective: str, out: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([sys.executable, "-c", CHILD, name, objective, str(out), tmp], cwd=tree, env=env,
                           capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(path, feeds: dict) -> np.ndarray:
    from onnx_lowrank import runtime

    sess = runtime.session(str(path), runtime.CALIBRATION, threads=1)
    return sess.run(None, feeds)[0]


def score(name: str, original: Path, path: Path) -> dict:
    import test_no_result_moves as t

    if name == "mnist_vgg":
        with np.load(t.DEMO / "heldout.npz") as z:
            x, labels = z["input"], z["label"]
        ref, out = run(original, {"input": x}), run(path, {"input": x})
        return {"accuracy": float((out.argmax(1) == labels).mean()),
                "top-1 agreement": float((out.argmax(1) == ref.argmax(1)).mean())}
    x = t.text_lines(30, seed=1)
    ref, out = run(original, {"x": x}), run(path, {"x": x})
    return {"relative error": float(((out - ref) ** 2).sum() / (ref ** 2).sum()),
            "argmax agreement": float((out.argmax(-1) == ref.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, type=Path)
    ap.add_argument("--name", default="result_moves")
    args = ap.parse_args()
    import test_no_result_moves as t

    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mnist_vgg", "ppocr_rec"):
            original = t.model_and_data(name)[0]
            for objective in ("flops", "latency"):
                for label, tree in (("old", args.old.resolve()), ("new", common.ROOT)):
                    out = Path(tmp) / f"{name}_{objective}_{label}.onnx"
                    digest = compress(tree, name, objective, out)
                    s = score(name, original, out)
                    data.append({"model": name, "objective": objective, "code": label, "sha256": digest, **s})
                    rows.append([name, objective, label, digest[:12]] + [f"{k} {v:.6f}" for k, v in s.items()])
    md = common.header(f"No-result-moves cases: {args.old.name} against this tree ({args.name})")
    md += (f"Old = `{args.old}`, new = this tree. The four compressions of tests/test_no_result_moves.py (its "
           "settings), scored against the original model on inputs the compression did not see (see the script's "
           "docstring).\n\n")
    md += common.markdown_table(["model", "objective", "code", "sha256", "score", "score"], rows)
    common.write_result(args.name, md)
    (common.RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
