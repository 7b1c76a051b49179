"""Assemble benchmarks/RESULTS.md from the files in benchmarks/results/.

Each benchmark script writes its own section, `results/<name>.md` (command, machine, date, table);
this concatenates them in the order of ORDER under a short guide, so RESULTS.md never holds a number
that no script wrote, and regenerating it loses nothing written by hand.

Text written by hand (a reading of a run, a note on how it was rerun, a correction) lives in
`results/<name>.reading.md`, never in RESULTS.md or in the script-written `<name>.md` (a rerun
overwrites those). It is placed right after section `<name>`. Its first line must say
"written by hand" (a heading such as `### Reading (written by hand after this run)`, or a paragraph
starting `Reading (written by hand): ...`); the script refuses a reading file that does not, or
one whose name is not in ORDER. A hand-written section with no script of its own is a
`<name>.reading.md` alone, listed in ORDER with its title. To add a reading: write the file, then

    python benchmarks/collect_results.py            # rewrite RESULTS.md
    python benchmarks/collect_results.py --check    # exit 1 if RESULTS.md is not what it would write

`results/section_*.md` files (sections a helper proposes) are not included: a section is in
RESULTS.md only once it is named in ORDER.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CSV_MACHINE = "2 cores, x86_64, Python 3.11.7, onnxruntime 1.31.1"
# (name, title) or, for a section read from a CSV file alone, (name, title, command, machine, date):
# a CSV holds neither the machine nor the date of its run.
ORDER = [
    ("mnist_methods", "Issue 3: method comparison on the demo model"),
    ("mnist_sweep", "Issue 4: sweep of the demo model", "`bash benchmarks/mnist_sweep.sh`",
     CSV_MACHINE, "2026-11-21"),
    ("peer_baselines_mnist", "Issue 4: peer baselines on the demo model"),
    ("efficientnet_lite0", "Issue 3 / 4: EfficientNet-Lite0 on real photographs"),
    ("efficientnet_lite0_sweep", "Issue 4: sweep of EfficientNet-Lite0 (nonlinear + asymmetric)",
     "the `efficientnet_lite0.py` command of the previous section (package at commit c45fd31)",
     CSV_MACHINE, "2026-11-21"),
    ("peer_baselines_efficientnet", "Issue 4: peer baselines on EfficientNet-Lite0"),
    ("ppocr_rec", "Issue 3 / 9: PP-OCRv4 recogniser, character error rate"),
    ("ppocr_det", "Issue 9: PP-OCRv4 detector, probability-map agreement"),
    ("tool_cost", "Issue 3: tool cost on materialised VGG-19"),
    ("light_coverage", "Issue 2: graph coverage on the onnx light model-zoo architectures"),
    ("samples_per_layer", "Issue 9: samples per layer (rows per output channel)"),
    ("int8_demo", "Issue 9: INT8 after factorisation on the demo model"),
    ("latency_objective", "Issue 7: latency objective vs FLOP objective (1 and 2 threads)"),
    ("latency_objective_t2", "Issue 7: latency objective at 2 threads, non-spinning timing (final)"),
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
    ("recover2_notes", "Issue 16: why EfficientNet-Lite0 got worse, and mixing augmentations (reading)"),
    ("recover_probe", "Issue 16: recovery probe on EfficientNet-Lite0 (augmentations)"),
    ("recover_efficientnet_2", "Issue 16: recovery on EfficientNet-Lite0, augmentations none / mixup / auto"),
    ("recover_efficientnet_fresh", "Issue 16: recovery on EfficientNet-Lite0 from fresh crops"),
    ("recover_efficientnet_fresh_lr", "Issue 16: recovery on EfficientNet-Lite0 from fresh crops, higher lr"),
    ("recover_efficientnet_fresh_warm", "Issue 16: recovery on EfficientNet-Lite0 from fresh crops, longer warm-up"),
    ("recover_demo_mix", "Issue 16: recovery on the demo with mixup / cutmix"),
    ("recover_demo_mix_long", "Issue 16: recovery on the demo with cutmix / zoom, 40 epochs"),
    ("recover_demo_warm", "Issue 16: recovery on the demo, longer warm-up"),
    ("recover_kl_notes", "Issue 16: a KL distillation loss instead of output NMSE (reading)"),
    ("recover_demo_kl", "Issue 16: recovery on the demo, NMSE vs KL at T 1 / 2 / 4"),
    ("recover_demo_kl_seeds", "Issue 16: recovery on the demo, NMSE vs KL over five seeds"),
    ("recover_demo_kl_all", "Issue 16: recovery on the demo, NMSE vs KL over five seeds, every weight trained"),
    ("recover_demo_scheme_auto", "Issue 16: the demo at 10x with --scheme auto (3-D), then recovery (NMSE)"),
    ("recover_demo_scheme_auto_kl", "Issue 16: the demo at 10x with --scheme auto (3-D), then recovery (KL)"),
    ("recover_kl_spread", "Issue 16: where the KL loss sits on the demo's images"),
    ("recover_rec2x_notes", "Issue 16: the PP-OCRv4 recogniser with today's defaults, and the measured 2x (reading)"),
    ("recover_ppocr_rec_lat2x_m16", "Issue 16: PP-OCRv4 recogniser at 2x measured latency, ranks multiples of 16"),
    ("recover_ppocr_rec_lat2x", "Issue 16: PP-OCRv4 recogniser at 2x measured latency, ranks multiples of 1"),
    ("recover_ppocr_rec_3x_none", "Issue 16: recovery on the PP-OCRv4 recogniser at 3x FLOPs, augment none"),
    ("recover_ppocr_rec_3x_cn", "Issue 16: recovery on the PP-OCRv4 recogniser at 3x FLOPs, crop + noise"),
    ("recover_ppocr_rec_lat1.7x", "Issue 16: recovery on the PP-OCRv4 recogniser at 1.7x measured latency"),
    ("recover_ppocr_rec_5x_none", "Issue 16: recovery on the PP-OCRv4 recogniser at 5x FLOPs, augment none"),
    ("recover_det_notes", "Issue 16: recovery on the PP-OCRv4 detector, and the learning-rate floor (reading)"),
    ("recover_ppocr_det_lat2x_m16", "Issue 16: PP-OCRv4 detector at 2x measured latency, ranks multiples of 16"),
    ("recover_ppocr_det_lat2x", "Issue 16: PP-OCRv4 detector at 2x measured latency, ranks multiples of 1"),
    ("recover_ppocr_det_lat1.25x", "Issue 16: PP-OCRv4 detector at 1.25x measured latency, before the lr floor fix"),
    ("recover_ppocr_det_lat1.25x_calib", "Issue 16: PP-OCRv4 detector at 1.25x measured latency, lr 1e-4 / 1e-3 on "
     "the calibration pages"),
    ("recover_ppocr_det_lat1.25x_fresh", "Issue 16: PP-OCRv4 detector at 1.25x measured latency, 512 fresh pages"),
    ("recover_ppocr_det_flops3x_fresh", "Issue 16: PP-OCRv4 detector at 3x FLOPs, 512 fresh pages"),
    ("recover_demo_floorfix", "Issue 16: recovery on the demo after the lr floor fix, lr 1e-4 / 3e-4 / 1e-3"),
    ("recover_lr_floor_probe", "Issue 16: a probe of the learning-rate floor (weights floored too)"),
    ("recover_ppocr_rec_3x_floorweights", "Issue 16: probe, recogniser at 3x FLOPs, weights floored too"),
    ("recover_ppocr_det_lat1.25x_floorweights", "Issue 16: probe, detector at 1.25x, weights floored too"),
    ("recover_demo_floorweights", "Issue 16: probe, demo at 10x, weights floored too"),
    ("recover_ppocr_rec_3x_prefix", "Issue 16: PP-OCRv4 recogniser at 3x FLOPs, before the lr floor fix (ed8e359)"),
    ("recover_ppocr_rec_3x_floorfix", "Issue 16: PP-OCRv4 recogniser at 3x FLOPs after the lr floor fix, lr 1e-4 / "
     "1e-3"),
    ("allocation_demo_flops_4x", "Issue 15: energy vs sensitivity allocation, demo at 4x FLOPs"),
    ("allocation_demo_flops_6x", "Issue 15: energy vs sensitivity allocation, demo at 6x FLOPs (any rank)"),
    ("allocation_ppocr_rec_latency_1.5x", "Issue 15: energy vs sensitivity allocation, PP-OCRv4 recogniser at "
     "measured 1.5x"),
    ("head_layer", "Issue 15: the output head kept whole by default (the recogniser's classifier)"),
    ("allocation_notes", "Issue 15: what the damage measurements miss"),
    ("allocation_refined_demo_flops_4x", "Issue 15: energy vs refined allocation (exchanges checked end to end), "
     "demo at 4x FLOPs"),
    ("allocation_refined_demo_flops_6x", "Issue 15: energy vs refined allocation, demo at 6x FLOPs (any rank)"),
    ("allocation_refined_ppocr_rec_latency_1.5x", "Issue 15: energy vs refined allocation, PP-OCRv4 recogniser at "
     "measured 1.5x"),
    ("allocation_refined_ppocr_rec_latency_1.5x_cold_cache", "Issue 15: energy vs refined allocation, PP-OCRv4 "
     "recogniser at measured 1.5x, latency tables measured afresh"),
    ("allocation_refined_ppocr_rec_latency_1.5x_head_kept", "Issue 15: energy vs refined on the recogniser at "
     "measured 1.5x, output head kept whole"),
    ("exchange_ranking_demo_6x_m1", "Issue 15: do short fits rank the exchanges like the real fits? Demo"),
    ("exchange_ranking_ppocr_rec_1.5x_m16", "Issue 15: do short fits rank the exchanges like the real fits? "
     "PP-OCRv4 recogniser"),
    ("allocation_refined_notes", "Issue 15: exchanges checked end to end (reading)"),
    ("memory_cap_100", "Issue 17: peak memory after the solve's memory fix, 100 images"),
    ("memory_cap_500", "Issue 17: peak memory after the solve's memory fix, 500 images (the issue's case)"),
    ("parallel_solve", "Issue 17: independent layer solves in 2 processes?"),
    ("compress_time_rec", "Issue 17: compress time, PP-OCRv4 recogniser (solvetime branch)"),
    ("compress_time_vgg19", "Issue 17: compress time, light VGG-19"),
    ("compress_time_minilm", "Issue 17: compress time, MiniLM"),
    ("compress_time_profile_rec", "Issue 17: where the recogniser's solve goes (profile)"),
    ("compress_time", "Issue 17: compress-time targets (reading)"),
    ("compress_time_rec_merged", "Issue 17: compress time, PP-OCRv4 recogniser on the merged code"),
    ("compress_time_rec_capfix", "Issue 17: the recogniser with wide layers capped alone under --max-memory"),
    ("compress_time_rec_16g", "Issue 17: the recogniser with a 16G memory cap"),
    ("compress_time_rec_capkind", "Issue 17: the recogniser at 2G with the solve reserved by kind of fit"),
    ("compress_time_rec_recspeed", "Issue 17: the recogniser at 2G, branch recspeed"),
    ("compress_time_rec_recspeed_pair", "Issue 17: the recogniser at 2G, branch point and recspeed alternately"),
    ("compress_time_profile_rec_recspeed", "Issue 17: where the recogniser's solve goes, branch recspeed (profile)"),
    ("memory_cap_500_recspeed", "Issue 17: peak memory, 500 images, with the solve reserved by kind of fit"),
    ("memory_cap_500_final", "Issue 17: peak memory, 500 images, the final tree"),
    ("moved_hashes_recspeed", "Issue 17: the byte-identity test's cases before and after branch recspeed"),
    ("compress_time_minilm_mstep", "Issue 17: MiniLM compress time with the whitened float32 M step and the "
     "held-back stop"),
    ("compress_time_minilm_mstep2", "Issue 17: MiniLM compress time with the M-step work, second run"),
    ("layer_time_mstep", "Issue 17: one MiniLM feed-forward layer's solve before and after the M-step work"),
    ("compress_time_rec_mstep", "Issue 17: the recogniser with the whitened float32 M step and the held-back stop"),
    ("rec_output_error_mstep", "Issue 17: the recogniser's output error before and after the M-step work"),
    ("result_moves_mstep", "Issue 17: no-result-moves cases before and after the M-step work"),
    ("compress_time_rec_final", "Issue 17: the recogniser on the merged tree, quiet machine"),
    ("compress_time_rec_zthreads", "Issue 17: the recogniser with the z step on two threads (branch zthreads)"),
    ("compress_time_rec_threads", "Issue 17: the recogniser on the final tree, two runs"),
    ("compress_time_profile_final_rec", "Issue 17: where the recogniser's solve goes on the final tree (profile)"),
    ("compress_time_minilm_final", "Issue 17: MiniLM on the final tree"),
    ("result_moves_merged", "Issue 17: no-result-moves cases before and after merging the two solver branches"),
    ("compress_time_minilm_final2", "Issue 17: MiniLM on the merged tree"),
    ("compress_time_rec_final2", "Issue 17: the recogniser's solve on the merged tree, quiet machine"),
    ("compress_time_rec_recfast", "Issue 17: the recogniser's solve, main against branch recfast alternately"),
    ("compress_time_profile_recfast_rec", "Issue 17: where the recogniser's solve goes, branch recfast (profile)"),
    ("result_moves_recfast", "Issue 17: no-result-moves cases before and after branch recfast's float32 loop"),
    ("layer_time_rec_recfast", "Issue 17: the recogniser's widest HardSwish layer solved by main and branch recfast"),
    ("layer_time_rec_recfast2", "Issue 17: the same layer, branch recfast's last commit, busier machine"),
    ("compress_time_rec_recfast3", "Issue 17: the recogniser's solve, main against branch recfast, three runs each"),
    ("large_model", "Issue 14: a generated model over 2 GB, compressed with external data"),
    ("timing_stability_vgg19_t2", "Issue 13: timing that can be trusted on a slow model"),
    ("suite_time", "Issue 13: test suite time, the tests both trees hold"),
]

PREAMBLE = """# Benchmark results

Every number below was written by a script in `benchmarks/` (the command heads each section),
on the machine and date given there. The machine is a shared 2-core one: latencies are medians of
interleaved runs and only ratios measured side by side in one run are reported; absolute times
are noisy. Regenerate a section by rerunning its command, then `python benchmarks/collect_results.py`.
Extra packages for the benchmarks: `pip install -r benchmarks/requirements.txt`.
"""


def render() -> str:
    """RESULTS.md as the files in results/ make it."""
    names = {entry[0] for entry in ORDER}
    for path in sorted(RESULTS.glob("*.reading.md")):
        if path.name[:-len(".reading.md")] not in names:
            sys.exit(f"{path}: no section of that name in ORDER; add it there")
    parts = [PREAMBLE]
    for name, title, *source in ORDER:
        md, csv = RESULTS / f"{name}.md", RESULTS / f"{name}.csv"
        if md.exists():
            body = md.read_text().strip().replace("\n## ", "\n### ")
        elif csv.exists():
            command, machine, when = source
            body = (f"- command: {command}\n- machine: {machine}\n- date: {when}\n\n"
                    f"See `benchmarks/results/{csv.name}` and `{name}.png`.\n\n" + _csv_table(csv))
        else:
            body = ""
        reading = _reading(name)
        if body or reading:
            parts.append(f"# {title}\n\n" + "\n\n".join(t for t in (body, reading) if t) + "\n")
    return "\n".join(parts)


def _reading(name: str) -> str:
    path = RESULTS / f"{name}.reading.md"
    if not path.exists():
        return ""
    text = path.read_text().strip()
    if "written by hand" not in text.splitlines()[0].lower():
        sys.exit(f"{path}: its first line must say 'written by hand'")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and show the first differences if RESULTS.md is stale")
    args = parser.parse_args(argv)
    target, text = HERE / "RESULTS.md", render()
    if not args.check:
        target.write_text(text)
        print(f"wrote {target}")
        return 0
    current = target.read_text() if target.exists() else ""
    if current == text:
        print(f"{target} is up to date")
        return 0
    diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "RESULTS.md", "collect_results.py",
                                n=1, lineterm="")
    print("\n".join(list(diff)[:40]))
    print(f"{target} differs from what collect_results.py writes (first lines above)")
    return 1


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
    sys.exit(main())
