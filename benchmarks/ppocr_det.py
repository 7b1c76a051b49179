"""PP-OCRv4 text detector: agreement of the text-probability map after low-rank factorisation.

The detector (``ch_PP-OCRv4_det_infer.onnx``, shipped in ``rapidocr-onnxruntime==1.4.4``) is run
on pages of words rendered with Pillow's built-in font (several lines, random sizes and positions,
dark text on white or greyish backgrounds, a little noise), resized to a multiple of 32 (320x320
by default). Preprocessing follows RapidOCR's ``DetPreProcess``: ``(x / 255 - mean) / std`` with the
ImageNet mean and std, CHW. Metrics against the original model, on held-out pages:

- F1 and IoU of the probability map binarised at 0.3 (DB's default threshold), over all pixels;
- mean absolute error of the probability map;
- word recall: share of rendered words whose box has at least 20% of its pixels above 0.3
  (a ground-truth check, reported for the original too).

    pip install rapidocr-onnxruntime==1.4.4
    python benchmarks/ppocr_det.py                       # default vs linear --no-asymmetric at 1.5x and 2x
    python benchmarks/ppocr_det.py --quick               # smoke test (24 / 12 pages)

Writes ``benchmarks/results/ppocr_det.md`` and ``ppocr_det.json`` (``--quick``: ``ppocr_det_quick.*``); compressed models go to
``.cache/ppocr_det/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from ppocr_rec import PUNCT, WORDS, package_dir  # noqa: E402

MODEL_FILE = "models/ch_PP-OCRv4_det_infer.onnx"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
THRESH = 0.3
FONT_SIZES = (14, 18, 22, 26, 32, 40)


# ----------------------------------------------------------------------------------------- data

def render_page(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A ``size`` x ``size`` RGB page of a few text lines, and the box (x0, y0, x1, y1) of every word."""
    from PIL import Image, ImageDraw, ImageFont

    bg = int(rng.integers(200, 256))
    tint = rng.integers(-12, 13, 3) if rng.random() < 0.5 else np.zeros(3, int)
    img = Image.new("RGB", (size, size), tuple(int(np.clip(bg + t, 0, 255)) for t in tint))
    draw = ImageDraw.Draw(img)
    boxes = []
    y = int(rng.integers(4, 24))
    while True:
        font_size = int(FONT_SIZES[rng.integers(len(FONT_SIZES))])
        font = ImageFont.load_default(size=font_size)
        if y + font_size * 1.3 > size - 4:
            break
        ink = int(rng.integers(0, 90))
        x = int(rng.integers(4, max(5, size // 4)))
        for _ in range(int(rng.integers(1, 7))):
            w = WORDS[rng.integers(len(WORDS))]
            if rng.random() < 0.25:
                w = str(rng.integers(0, 10 ** rng.integers(1, 5)))
            if rng.random() < 0.2:
                w += PUNCT[rng.integers(len(PUNCT))]
            left, top, right, bottom = draw.textbbox((x, y), w, font=font)
            if right > size - 4:
                break
            draw.text((x, y), w, font=font, fill=(ink, ink, ink))
            boxes.append((left, top, right, bottom))
            x = right + int(font_size * rng.uniform(0.3, 0.8))
        y += int(font_size * rng.uniform(1.3, 2.2))
    a = np.asarray(img).astype(np.float32)
    a += rng.normal(0, 3, a.shape).astype(np.float32)
    return np.clip(a, 0, 255).astype(np.uint8), boxes


def normalise(img: np.ndarray) -> np.ndarray:
    return ((img.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)


def make_pages(n: int, seed: int, size: int):
    rng = np.random.default_rng(seed)
    pages = [render_page(rng, size) for _ in range(n)]
    return np.stack([normalise(p) for p, _ in pages]), [b for _, b in pages]


# ------------------------------------------------------------------------------------- metrics

def prob_maps(model, x: np.ndarray, batch: int = 8) -> np.ndarray:
    from onnx_lowrank import runtime

    sess = runtime.session(model, runtime.TIMING)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0][:, 0] for i in range(0, len(x), batch)])


def map_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    a, b = ref > THRESH, got > THRESH
    inter, union = float(np.sum(a & b)), float(np.sum(a | b))
    total = float(a.sum() + b.sum())
    return {"f1": 2 * inter / total if total else 1.0, "iou": inter / union if union else 1.0,
            "mae": float(np.mean(np.abs(ref - got)))}


def word_recall(maps: np.ndarray, boxes: list[list[tuple]]) -> float:
    hit = n = 0
    for m, page in zip(maps, boxes):
        for x0, y0, x1, y1 in page:
            region = m[max(y0, 0):y1, max(x0, 0):x1]
            n += 1
            hit += bool(region.size and np.mean(region > THRESH) >= 0.2)
    return hit / max(n, 1)


# ---------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speedups", default="1.5,2")
    ap.add_argument("--methods", default="default,linear --no-asymmetric",
                    help="comma-separated; each 'default' or CLI flags, e.g. 'linear --no-asymmetric'")
    ap.add_argument("--size", type=int, default=320, help="page side, a multiple of 32")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="24 calibration / 12 eval pages, 10 latency runs")
    args = ap.parse_args()
    if args.size % 32:
        raise SystemExit("--size must be a multiple of 32")
    if args.quick:
        args.calib, args.eval, args.runs = 24, 12, 10
    speedups = [float(s) for s in args.speedups.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    specs = {m: common.method_spec(m) for m in methods}

    from onnx_lowrank import CompressConfig, Compressor

    t_start = time.perf_counter()
    model_path = package_dir() / MODEL_FILE

    t0 = time.perf_counter()
    calib_x, _ = make_pages(args.calib, seed=1, size=args.size)
    eval_x, eval_boxes = make_pages(args.eval, seed=2, size=args.size)
    t_data = time.perf_counter() - t0
    n_words = sum(len(b) for b in eval_boxes)
    print(f"data: {len(calib_x)} calibration + {len(eval_x)} eval pages ({n_words} eval words), {t_data:.1f}s")

    ref = prob_maps(model_path, eval_x)
    recall_orig = word_recall(ref, eval_boxes)
    text_share = float(np.mean(ref > THRESH))
    print(f"original: word recall {recall_orig:.4f}, {100 * text_share:.1f}% of pixels above {THRESH}")

    cache = common.CACHE / "ppocr_det"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    comp = Compressor(str(model_path), {"x": calib_x}, CompressConfig(speedup=2.0, objective="flops", rank_multiple=1))
    t_calib = time.perf_counter() - t0
    print(f"calibration: {t_calib:.1f}s; {common.activation_summary(comp.layers)}")

    max_speedup = common.max_reachable(comp)
    print(f"max reachable theoretical speed-up: {max_speedup:.3f}x")

    def evaluate(model):
        maps = prob_maps(model, eval_x)
        return {**map_agreement(ref, maps), "word_recall": word_recall(maps, eval_boxes), "word_recall_orig": recall_orig}

    def describe(row):
        print(f"{row['speedup']}x {row['method']}: F1 {row['f1']:.4f} IoU {row['iou']:.4f} MAE {row['mae']:.4g} "
              f"word recall {row['word_recall']:.4f} theoretical {row['theoretical']:.3f}x "
              f"({row['factorised']} factorised, {row['nonlinear_layers']} nonlinear) {row['compress_s']:.1f}s",
              flush=True)

    results, paths = common.compress_grid(comp, speedups, methods, specs, cache, "det", evaluate, describe,
                                          max_speedup)
    t0 = time.perf_counter()
    lat = common.bench_grid(results, {"original": str(model_path), **paths}, {"x": eval_x[:1]}, args.runs, 3)
    t_bench = time.perf_counter() - t0
    print(f"bench: original {lat['original']['median_ms']:.2f} ms median, {t_bench:.1f}s")

    total = time.perf_counter() - t_start
    write(args, results, recall_orig, text_share, n_words, max_speedup, lat, t_data, t_calib, t_bench, total, comp)


def write(args, results, recall_orig, text_share, n_words, max_speedup, lat, t_data, t_calib, t_bench, total,
          comp) -> None:
    rows = [[f"{r['speedup']:g}", r["method"] + (f" (= {r['identical_to']})" if r["identical_to"] else ""),
             r["f1"], r["iou"], r["mae"], r["word_recall_orig"], r["word_recall"], r["theoretical"],
             r["conv_theoretical"], r["nonlinear_layers"], r["latency_ratio"], f"{r['compress_s']:.1f}"]
            for r in results]
    table = common.markdown_table(
        ["target", "method", f"F1 (map > {THRESH})", "IoU", "map MAE", "word recall original",
         "word recall compressed", "theoretical speed-up", "conv speed-up", "nonlinear layers",
         "latency ratio (1 thr, b1)", "compress s"], rows)
    skipped = [lay for lay in comp.layers if lay.skip_reason]
    md = common.header("PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4)")
    md += (f"- data: {args.calib} calibration / {args.eval} evaluation pages of {args.size}x{args.size}, words "
           f"rendered with Pillow's `ImageFont.load_default(size)` (sizes {', '.join(map(str, FONT_SIZES))}), "
           f"seeds 1 / 2; {n_words} evaluation words\n"
           f"- original model: word recall {recall_orig:.4f}; {100 * text_share:.1f}% of evaluation pixels above "
           f"{THRESH}\n"
           f"- Conv layers: {len(comp.layers)}, of which {len(skipped)} cannot be factorised; "
           f"largest reachable theoretical speed-up (every candidate at rank 1): {max_speedup:.3f}x\n"
           f"- {common.activation_summary(comp.layers)}\n"
           f"- latency: `measure.bench`, batch 1 ({args.size}x{args.size}), 1 thread, {args.runs} interleaved runs, "
           f"original {lat['original']['median_ms']:.2f} ms median\n"
           f"- times: data {t_data:.0f}s, calibration {t_calib:.0f}s, bench {t_bench:.0f}s, whole run "
           f"{total / 60:.1f} min\n\n")
    md += table + "\n\n"
    md += (f"F1 / IoU: the compressed model's probability map binarised at {THRESH} against the original's, "
           "over all evaluation pixels. Map MAE: mean absolute difference of the probability maps. Word recall: "
           f"share of rendered words with at least 20% of their box above {THRESH}. Theoretical speed-up = whole "
           "model FLOPs (every node, `node_flops`) before / after; conv speed-up = Conv FLOPs only. Latency ratio = "
           "original median / compressed median.\n\n")
    md += common.versus(results, "f1", "map F1", lower_is_better=False) + "\n"
    md += common.versus(results, "mae", "map MAE", lower_is_better=True) + "\n"
    md += NOTES
    name = "ppocr_det" + ("_quick" if args.quick else "")  # a smoke test never replaces the real results
    common.write_result(name, md)
    (common.RESULTS / f"{name}.json").write_text(json.dumps(
        {"word_recall_orig": recall_orig, "max_speedup": max_speedup,
         "latency_original_ms": lat["original"]["median_ms"], "rows": results}, indent=1, default=str))


NOTES = """### Notes

- "default" is the tool's default (nonlinear reconstruction after the activation, asymmetric);
  "linear --no-asymmetric" is PCA of each layer's responses on the original inputs.
- The neck's RSE layers (`x + x * HardSigmoid(SE(x))`) and the stem have no elementwise activation
  after their Conv: those are fitted on the Conv output by every method.
- Latency on this shared 2-core machine: treat as +-10%.
"""

if __name__ == "__main__":
    main()
