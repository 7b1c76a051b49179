"""Evidence for re-recording tests/test_no_result_moves.py: the four guarded compressions, by two trees.

Each tree (``--trees``, default: the branch point and this tree) compresses the four (model, objective)
cases with the test's own settings (tests/test_no_result_moves.py: SETTINGS, latency tables in tests/data),
each in a subprocess with that tree on PYTHONPATH; for each output: its sha256 and its fidelity to the
original model on inputs neither was calibrated on (demo: the 1,500 held-out digits, top-1 agreement and
accuracy; recogniser: 100 rendered lines of another seed, the relative error of the logits and the
agreement of the greedy CTC paths).

    python benchmarks/moved_hashes.py --trees /tmp/base,. --name moved_hashes_recspeed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import common
from result_moves import run as _outputs

CHILD = r"""
import hashlib, json, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path.cwd() / "tests"))
import test_no_result_moves as t
out = {}
for name in ("mnist_vgg", "ppocr_rec"):
    for objective in ("flops", "latency"):
        tmp = Path(tempfile.mkdtemp())
        table = None
        if objective == "latency":
            table = tmp / "table.json"
            shutil.copy(t.DATA / f"{name}.latency.json", table)
        path = Path(sys.argv[1]) / f"{name}.{objective}.onnx"
        out[f"{name}/{objective}"] = t.compress(name, objective, path, table)
print(json.dumps(out))
"""


def fidelity(name: str, path: Path, original: Path) -> dict:
    sys.path.insert(0, str(common.ROOT / "tests"))
    import test_no_result_moves as t

    if name == "mnist_vgg":
        data = np.load(common.ROOT / "models" / "mnist_vgg" / "heldout.npz")
        feed, labels = {"input": data["input"]}, data["label"]
        ref, got = _outputs(original, feed), _outputs(path, feed)
        return {"top1 agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
                "accuracy": float((got.argmax(1) == labels).mean()),
                "rel error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
    feed = {"x": t.text_lines(100, seed=7)}
    ref, got = _outputs(original, feed), _outputs(path, feed)
    return {"path agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "rel error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default=".", help="comma-separated source trees (each compresses all four cases)")
    ap.add_argument("--name", default="moved_hashes")
    args = ap.parse_args()
    sys.path.insert(0, str(common.ROOT / "tests"))
    import test_no_result_moves as t

    originals = {"mnist_vgg": t.model_and_data("mnist_vgg")[0], "ppocr_rec": t.recogniser()}
    rows, record = [], {}
    for tree in args.trees.split(","):
        tree = str(Path(tree).resolve())
        work = common.CACHE / "moved_hashes" / Path(tree).name
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=tree)
        p = subprocess.run([sys.executable, "-c", CHILD, str(work)], env=env, cwd=tree, capture_output=True,
                           text=True, check=True)
        digests = json.loads(p.stdout.strip().splitlines()[-1])
        commit = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h"], capture_output=True,
                                text=True).stdout.strip() or Path(tree).name
        for case, digest in digests.items():
            name, objective = case.split("/")
            fid = fidelity(name, work / f"{name}.{objective}.onnx", originals[name])
            record[f"{tree}:{case}"] = {"sha256": digest, **fid}
            rows.append([commit or tree, name, objective, digest[:16],
                         ", ".join(f"{k} {v:.6g}" for k, v in fid.items())])
    md = common.header("Outputs of the byte-identity test's four cases, by tree")
    md += "Settings of tests/test_no_result_moves.py (SETTINGS, latency tables from tests/data); fidelity on " \
          "inputs neither tree calibrated on (demo: 1,500 held-out digits; recogniser: 100 rendered lines, seed 7).\n\n"
    md += common.markdown_table(["tree", "model", "objective", "sha256 (first 16)", "fidelity to the original"], rows)
    common.write_result(args.name, md)
    (common.RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
