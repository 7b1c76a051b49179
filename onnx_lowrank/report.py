"""The report: built as a dict (the JSON report), printed as tables.

:func:`table` is the one table printer: the compress report, ``layers``, ``bench``, ``eval`` and
``sweep`` all print through it.
"""

from __future__ import annotations

import math

from .solver.allocation import ALLOCATORS, damage_at
from .graph.dense import is_dense
from .sampling_plan import held_back
from .schemes import SCHEMES
from .solver.nonlinear import STOP_TOL


def table(header: list[str], rows: list[list], left: int = 1) -> list[str]:
    """Columns padded to width; the first ``left`` columns left-aligned (names), the rest right-aligned (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list) -> str:
        return "  ".join(
            str(cell).ljust(w) if j < left else str(cell).rjust(w) for j, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def build_report(plan: list, flops: dict[str, int], cfg, images: int, seconds: float, costs) -> dict:
    """The JSON report of one compression (see README "The report")."""
    total_before = sum(flops.values())
    conv_before = sum(p.flops_before for p in plan if not is_dense(p.layer))
    saved = sum(p.flops_before - p.flops_after for p in plan)
    dense_before = sum(p.flops_before for p in plan if is_dense(p.layer))
    dense_after = sum(p.flops_after for p in plan if is_dense(p.layer))
    layers = []
    for p in plan:
        lay = p.layer
        layers.append({
            "name": lay.name,
            "op": lay.op if is_dense(lay) else "Conv",
            "in_channels": lay.in_channels,
            "out_channels": lay.out_channels,
            "kernel": list(lay.kernel),
            "output_size": list(lay.out_shape[2:]) if lay.out_shape else None,
            "group": lay.group,
            "activation": lay.activation,
            "activation_unknown": lay.activation_unknown,
            "target": lay.target_description,
            "status": p.status,
            "reason": p.reason,
            "rank": p.rank,
            "break_even_rank": p.shape.break_even_rank() if p.candidate else None,
            "flops_before": p.flops_before,
            "flops_after": p.flops_after,
            "latency_before_ms": p.latency_before,
            "latency_after_ms": p.latency_after,
            "energy_kept": p.energy_kept,
            "method": p.method,
            "scheme": p.scheme.name if p.rank is not None else None,
            "asymmetric": p.asymmetric,
            "note": p.note,
            "rows": p.rows,
            "rel_error_linear": p.rel_error_linear,
            "rel_error": p.rel_error,
            "damage": None if p.damage is None or p.rank is None else damage_at(p.damage, p.rank),
            "damage_by_rank": p.damage,
            "saving_by_rank": p.saving,
        })
    after = total_before - saved
    conv_after = conv_before - saved + dense_before - dense_after
    return {
        "flops_before": total_before,
        "flops_after": after,
        "speedup_theoretical": total_before / after if after else math.inf,
        "conv_flops_before": conv_before,
        "conv_flops_after": conv_after,
        "conv_speedup_theoretical": conv_before / conv_after if conv_after else math.inf,
        # MatMul / Gemm layers with a constant weight (graph/dense.py)
        "dense_flops_before": dense_before,
        "dense_flops_after": dense_after,
        "target_speedup": cfg.speedup,
        "objective": cfg.objective,
        "rank_multiple": cfg.rank_multiple,
        **costs.report(plan, cfg),
        "method": cfg.method,
        # a stage of the nonlinear schedule ends once an iteration improves its objective by less than this
        "solver_stop_tolerance": STOP_TOL if cfg.method == "nonlinear" else None,
        "scheme": cfg.scheme,
        "allocation": cfg.allocation,
        "damage_metric": cfg.damage_metric if ALLOCATORS[cfg.allocation].needs_damage else None,
        "asymmetric": cfg.asymmetric,
        "balance": cfg.balance,
        "calibration_images": images,
        "held_back_images": held_back(images, cfg.holdout_every),
        "samples_per_image": cfg.samples_per_image,
        "seed": cfg.seed,
        "seconds": round(seconds, 2),
        "layers": layers,
    }


def _flops(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _scheme_label(name: str | None) -> str:
    label = getattr(SCHEMES.get(name), "label", "")
    return f"{label}, " if label else ""


def format_report(report: dict) -> str:
    head = ("layer", "c -> d", "kernel", "out", "rank", "FLOPs before", "FLOPs after", "energy", "rows", "rel.err", "note")
    rows = []
    for lay in report["layers"]:
        out = "x".join(map(str, lay["output_size"])) if lay["output_size"] else "?"
        rank = str(lay["rank"]) if lay["rank"] is not None else "-"
        note = lay["reason"] if lay["status"] == "skipped" else \
            _scheme_label(lay.get("scheme")) + \
            f"{lay['method']}{'+asym' if lay.get('asymmetric') else ''}, {lay['target']}" + \
            (f"; {lay['note']}" if lay.get("note") else "") + \
            (f"; damage {lay['damage']:.2g}" if lay.get("damage") is not None else "")
        rows.append((lay["name"], f"{lay['in_channels']} -> {lay['out_channels']}",
                     "x".join(map(str, lay["kernel"])), out, rank, _flops(lay["flops_before"]),
                     _flops(lay["flops_after"]), _pct(lay["energy_kept"]), lay.get("rows") or "-", _pct(lay["rel_error"]), note))
    lines = table(list(head), rows, left=len(head))
    n_fact = sum(1 for lay in report["layers"] if lay["status"] == "factorised")
    lines.append("")
    lines.append(f"factorised {n_fact} of {len(report['layers'])} layers "
                 f"({report['method']}{', asymmetric' if report['asymmetric'] else ''}, "
                 f"{report['calibration_images']} calibration images, {report['seconds']:.1f} s)")
    lines.append(f"whole model: {_flops(report['flops_before'])} -> {_flops(report['flops_after'])} FLOPs "
                 f"per image, {report['speedup_theoretical']:.2f}x theoretical speed-up")
    if report["conv_flops_before"]:
        lines.append(f"convs only : {_flops(report['conv_flops_before'])} -> {_flops(report['conv_flops_after'])} "
                     f"FLOPs, {report['conv_speedup_theoretical']:.2f}x")
    lines.append(f"ranks      : {report.get('objective', 'flops')} objective, {report.get('allocation', 'energy')} "
                 f"allocation, multiples of {report.get('rank_multiple', 1)}"
                 + (f" (timings: {report['latency_table']})" if report.get("latency_table") else ""))
    if report.get("predicted_latency_speedup"):
        lines.append(f"latency    : {report['latency_original_ms']:.3f} -> {report['latency_predicted_ms']:.3f} ms "
                     f"predicted, {report['predicted_latency_speedup']:.2f}x (sum of timed layers: "
                     f"{report['table_latency_speedup']:.2f}x"
                     + (f"; {len(report['latency_checks'])} whole-model check(s)" if report.get("latency_checks")
                        else "") + ")")
    if report.get("measured_latency_speedup"):
        m = report["latency_measured"]
        lines.append(f"measured   : {m['original_ms']:.3f} -> {m['compressed_ms']:.3f} ms, "
                     f"{report['measured_latency_speedup']:.2f}x (median of {m['runs']} interleaved rounds"
                     + (f", IQR {m['speedup_iqr'][0]:.2f}-{m['speedup_iqr'][1]:.2f}" if m.get("speedup_iqr") else "")
                     + ("" if m.get("stable", True) else ", not stable at the time cap") + ")"
                     + (f"; prediction off by {100 * report['latency_prediction_error']:+.1f}%"
                        if report.get("latency_prediction_error") is not None else ""))
    ex = report.get("exchanges")
    if ex and "damage_before" in ex:
        lines.append(f"exchanges  : {len(ex['taken'])} taken of {ex['layers_movable']} movable layers, held-back "
                     f"{ex['metric']} {ex['damage_before']:.4g} -> {ex['damage_after']:.4g} "
                     f"({ex['evaluations']} whole-model evaluations, {ex['solves']} solves, {ex['seconds']:.1f} s)"
                     + ("" if ex.get("damage_solved_again") is None else
                        f"; all solved again at those ranks: {ex['damage_solved_again']:.4g}"
                        + (", kept" if ex["kept_solved_again"] else ", not kept")))
        for t in ex["taken"]:
            lines.append("             " + "; ".join(f"{n} {a} -> {b or 'whole'}" for n, (a, b) in t["ranks"].items())
                         + f": {t['damage_before']:.4g} -> {t['damage_after']:.4g}")
    if report.get("external_data"):
        where = report["external_data"]
        lines.append("weights    : kept as external data" + (f", written to {where} beside the model"
                                                             if isinstance(where, str) else ""))
    lines.append("energy = response energy kept by the rank; rows = calibration samples fitted; rel.err = relative "
                 "squared error of the layer's target on held-back calibration images"
                 + (" (none held back: not measured)" if report.get("held_back_images") == 0 else ""))
    for t in report.get("search", []):
        lines.append(f"search: --speedup {t['speedup']:g} {t['status']}"
                     + (f" (top-1 agreement {t['top1_agreement']:.4f})" if "top1_agreement" in t else "")
                     + (f" (accuracy drop {t['accuracy_drop_points']:.2f} points)" if "accuracy_drop_points" in t else ""))
    ev = report.get("evaluation")
    if ev:
        parts = [f"on {ev['samples']} evaluation samples:"]
        if "accuracy_reference" in ev:
            parts.append(f"accuracy {100 * ev['accuracy_reference']:.2f}% -> {100 * ev['accuracy_candidate']:.2f}% "
                         f"(drop {ev['accuracy_drop_points']:.2f} points),")
        if "top1_agreement" in ev:
            parts.append(f"top-1 agreement {ev['top1_agreement']:.4f},")
        parts.append(f"output NMSE {ev['nmse']:.3g}")
        lines.append(" ".join(parts))
        if "budget" in report:
            lines.append("budget: " + ("passed" if report["budget"]["passed"] else "BROKEN"))
    return "\n".join(lines)


def _interval(spread: dict | None, key: str) -> str:
    if not spread:
        return "-"
    lo, hi = spread[key]
    return f"{lo:.2f}-{hi:.2f}" if math.isfinite(lo) and math.isfinite(hi) else "?"


def format_bench(result: dict) -> str:
    """Terminal table of a ``bench`` result, plus one per-op table per profiled model."""
    threads = result.get("threads")
    lines = [
        f"threads: {threads if threads is not None else 'onnxruntime default'}   "
        f"batch: {result.get('batch') if result.get('batch') is not None else '-'}"
    ]
    spreads = result.get("speedup_spread") or [None] * len(result["models"])
    rows = [
        [
            m["path"],
            f"{m['median_ms']:.3f}",
            f"{m['min_ms']:.3f}",
            f"{m['max_ms']:.3f}",
            f"{m['mean_ms']:.3f}",
            str(m["runs"]),
            f"{s:.2f}x",
            _interval(sp, "iqr"),
            _interval(sp, "ci95"),
        ]
        for m, s, sp in zip(result["models"], result["speedup"], spreads)
    ]
    lines += table(["model", "median ms", "min ms", "max ms", "mean ms", "runs", "speedup", "IQR", "95% CI"], rows)
    if result.get("rounds") is not None:
        how = {True: "stopped when every median was known within the tolerance",
               False: "stopped at the time cap before the medians were stable: rerun on a quieter machine",
               None: "fixed count"}[result.get("stable")]
        lines.append(f"{result['rounds']} interleaved rounds ({how}); speed-up = median of per-round ratios")
    for m in result["models"]:
        if "profile" not in m:
            continue
        lines += ["", f"profile: {m['path']} (per run)"]
        prows = [
            [p["op_type"], f"{p['total_ms']:.3f}", f"{p['percent']:.1f}", str(p["count"])] for p in m["profile"]
        ]
        lines += table(["op type", "ms", "%", "count"], prows)
    return "\n".join(lines)


def format_eval(result: dict) -> str:
    """Terminal key/value table of an ``evaluate`` result; classifier and accuracy rows only when present."""
    rows = [
        ["samples", str(result["samples"])],
        ["output", str(result["output"])],
        ["NMSE", f"{result['nmse']:.3e}"],
        ["max |diff|", f"{result['max_abs_diff']:.3e}"],
    ]
    if "top1_agreement" in result:
        rows += [
            ["top-1 agreement", f"{100 * result['top1_agreement']:.2f} %"],
            ["top-5 overlap", f"{100 * result['top5_overlap']:.2f} %"],
            ["KL divergence", f"{result['kl_divergence']:.3e}"],
        ]
    if "accuracy_reference" in result:
        rows += [
            ["accuracy (reference)", f"{100 * result['accuracy_reference']:.2f} %"],
            ["accuracy (candidate)", f"{100 * result['accuracy_candidate']:.2f} %"],
            ["accuracy drop", f"{result['accuracy_drop_points']:.2f} points"],
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def format_layers(layers: list) -> str:
    """The ``layers`` command: every Conv / MatMul / Gemm layer, and why some are skipped."""
    rows = [[lay.name, f"{lay.in_channels} -> {lay.out_channels}", "x".join(map(str, lay.kernel)), str(lay.group),
             "x".join(map(str, lay.out_shape[2:])) if lay.out_shape else "?", lay.target_description,
             lay.skip_reason or ("candidate (output head: automatic ranks keep it)" if lay.head else "candidate")]
            for lay in layers]
    return "\n".join(table(["name", "c -> d", "kernel", "group", "output", "activation", "status"], rows, left=7))


def format_sweep(rows: list[dict], columns: list[str]) -> str:
    """The ``sweep`` command's rows, one per speed-up."""
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in columns] for r in rows]
    return "\n".join(table(columns, cells, left=0))
