"""PP-OCRv4 recogniser candidates against the original on the 300 held-out lines of compress_time.py.

A finer measure than CER (which moves in steps of one character): the relative squared error of the output
(N x T x 6625 CTC probabilities) against the original model's, and the share of time steps whose argmax agrees.

    python benchmarks/rec_output_error.py --name NAME LABEL=PATH [LABEL=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
import ppocr_rec  # noqa: E402


def outputs(path, x: np.ndarray) -> np.ndarray:
    from onnx_lowrank import runtime

    sess = runtime.session(str(path), runtime.CALIBRATION, threads=1)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 50]})[0] for i in range(0, len(x), 50)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="LABEL=PATH")
    ap.add_argument("--name", default="rec_output_error")
    args = ap.parse_args()
    model = ppocr_rec.package_dir() / ppocr_rec.MODEL_FILE
    chars = ppocr_rec.character_list(model)
    texts, x = ppocr_rec.make_lines(300, seed=2, charset=set(chars[1:]))
    ref = outputs(model, x)
    rows, data = [], []
    for item in args.models:
        label, path = item.split("=", 1)
        out = outputs(path, x)
        hyps = [ppocr_rec.ctc_decode(p, chars) for p in out.argmax(-1)]
        row = {"candidate": label, "relative error": float(((out - ref) ** 2).sum() / (ref ** 2).sum()),
               "argmax agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
               "CER no spaces": float(ppocr_rec.cer(texts, hyps, spaces=False))}
        data.append(row)
        rows.append([label, f"{row['relative error']:.5f}", f"{row['argmax agreement']:.5f}",
                     f"{row['CER no spaces']:.5f}"])
    md = common.header("PP-OCRv4 recogniser candidates: output error against the original")
    md += ("300 held-out rendered lines (seed 2, as benchmarks/compress_time.py); relative squared error of the "
           "CTC output against the original model's, argmax agreement per time step, CER without spaces.\n\n")
    md += common.markdown_table(["candidate", "relative error", "argmax agreement", "CER no spaces"], rows)
    common.write_result(args.name, md)
    (common.RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
