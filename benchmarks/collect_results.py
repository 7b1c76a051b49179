"""Assemble benchmarks/RESULTS.md from the per-benchmark files in benchmarks/results/.

Each benchmark script writes its own section (command, machine, date, table); this only
concatenates them in a fixed order under a short guide, so RESULTS.md never holds a number that
no script wrote.

    python benchmarks/collect_results.py
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402
ORDER = [
    ("mnist_methods", "Issue 3: method comparison on the demo model"),
    ("mnist_sweep", "Issue 4: sweep of the demo model", "`bash benchmarks/mnist_sweep.sh`"),
    ("peer_baselines_mnist", "Issue 4: peer baselines on the demo model"),
    ("efficientnet_lite0", "Issue 3 / 4: EfficientNet-Lite0 on real photographs"),
    ("efficientnet_lite0_sweep", "Issue 4: sweep of EfficientNet-Lite0 (nonlinear + asymmetric)",
     "the `efficientnet_lite0.py` command of the previous section (package at commit c45fd31)"),
    ("peer_baselines_efficientnet", "Issue 4: peer baselines on EfficientNet-Lite0"),
    ("ppocr_rec", "Issue 3 / 9: PP-OCRv4 recogniser, character error rate"),
    ("ppocr_det", "Issue 9: PP-OCRv4 detector, probability-map agreement"),
    ("tool_cost", "Issue 3: tool cost on materialised VGG-19"),
    ("light_coverage", "Issue 2: graph coverage on the onnx light model-zoo architectures"),
    ("samples_per_layer", "Issue 9: samples per layer (rows per output channel)"),
    ("int8_demo", "Issue 9: INT8 after factorisation on the demo model"),
    ("latency_objective", "Issue 7: latency objective vs FLOP objective"),
    ("latency_objective_t2", "Issue 7: latency objective at 2 threads, rerun on a quiet machine"),
    ("spinning", "Issue 7: spinning intra-op threads and interleaved timing"),
    ("minilm_check", "Issue 8: MiniLM harness (all-MiniLM-L6-v2 sentence embeddings), check"),
    ("scheme_3d", "Issue 8: 3-D decomposition vs channel pair at equal FLOPs (demo model)"),
    ("minilm", "Issue 8: MiniLM MatMul layers factorised at 1.5x and 2x fewer MatMul FLOPs"),
    ("streaming", "Issue 14: streaming calibration, 2,000 images of 416 x 416, 1 vs 2 workers"),
    ("ray_cost", "Issue 14: the optional Ray extra"),
    ("matmul_latency", "Issue 13: MatMul / Gemm layers timed under the latency objective"),
    ("solver_speed", "Issue 17: z-step time and objective per activation"),
    ("recover_notes", "Issue 16: recovery by distillation, reading"),
    ("recover_demo_sweep", "Issue 16: recovery on the demo, learning-rate sweep"),
    ("recover_demo_long", "Issue 16: recovery on the demo, longer runs"),
    ("recover_demo_all", "Issue 16: recovery on the demo, every weight trained"),
    ("recover_ppocr_rec", "Issue 16: recovery on the PP-OCRv4 recogniser"),
    ("recover_efficientnet", "Issue 16: recovery on EfficientNet-Lite0"),
    ("allocation_demo_flops_4x", "Issue 15: energy vs sensitivity allocation, demo at 4x FLOPs"),
    ("allocation_demo_flops_6x", "Issue 15: energy vs sensitivity allocation, demo at 6x FLOPs (any rank)"),
    ("allocation_ppocr_rec_latency_1.5x", "Issue 15: energy vs sensitivity allocation, PP-OCRv4 recogniser at "
     "measured 1.5x"),
    ("allocation_notes", "Issue 15: what the damage measurements miss"),
    ("timing_stability_vgg19_t2", "Issue 13: timing that can be trusted on a slow model"),
    ("large_model", "Issue 14: a generated model over 2 GB, compressed with external data"),
    ("memory_cap", "Issue 17: peak memory of a compress (light ResNet-50, --max-memory)"),
    ("parallel_solve", "Issue 17: independent layer solves in 2 processes?"),
]

PREAMBLE = """# Benchmark results

Every number below was written by a script in `benchmarks/` (the command heads each section),
on the machine and date given there. The machine is a shared 2-core one: latencies are medians of
interleaved runs and only ratios measured side by side in one run are reported; absolute times
are noisy. Regenerate a section by rerunning its command, then `python benchmarks/collect_results.py`.
Extra packages for the benchmarks: `pip install -r benchmarks/requirements.txt`.
"""


def main():
    parts = [PREAMBLE]
    for name, title, *source in ORDER:
        md = HERE / "results" / f"{name}.md"
        csv = HERE / "results" / f"{name}.csv"
        if md.exists():
            body = md.read_text().strip()
            parts.append(f"# {title}\n\n{body.replace(chr(10) + '## ', chr(10) + '### ')}\n")
        elif csv.exists():
            when = datetime.date.fromtimestamp(csv.stat().st_mtime).isoformat()
            parts.append(f"# {title}\n\n- command: {source[0]}\n- machine: {machine()}\n- date: {when}\n\n"
                         f"See `benchmarks/results/{csv.name}` and `{name}.png`.\n\n" + _csv_table(csv) + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")


def _csv_table(path: Path) -> str:
    import csv

    rows = list(csv.DictReader(open(path)))
    cols = [c for c in rows[0] if any(r[c] for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_short(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _short(v: str) -> str:
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


if __name__ == "__main__":
    main()
