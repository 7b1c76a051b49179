"""The human-readable table printed at the end of ``compress`` (the JSON report is the dict itself)."""

from __future__ import annotations


def _flops(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def format_report(report: dict) -> str:
    head = ("layer", "c -> d", "kernel", "out", "rank", "FLOPs before", "FLOPs after", "energy", "rows", "rel.err", "note")
    rows = []
    for lay in report["layers"]:
        out = "x".join(map(str, lay["output_size"])) if lay["output_size"] else "?"
        rank = str(lay["rank"]) if lay["rank"] is not None else "-"
        note = lay["reason"] if lay["status"] == "skipped" else \
            ("3-D, " if lay.get("scheme") == "3d" else "") + \
            f"{lay['method']}{'+asym' if lay.get('asymmetric') else ''}, {lay['target']}" + \
            (f"; {lay['note']}" if lay.get("note") else "")
        rows.append((lay["name"], f"{lay['in_channels']} -> {lay['out_channels']}",
                     "x".join(map(str, lay["kernel"])), out, rank, _flops(lay["flops_before"]),
                     _flops(lay["flops_after"]), _pct(lay["energy_kept"]), lay.get("rows") or "-", _pct(lay["rel_error"]), note))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head) - 1)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[-1]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    n_fact = sum(1 for lay in report["layers"] if lay["status"] == "factorised")
    lines.append("")
    lines.append(f"factorised {n_fact} of {len(report['layers'])} layers "
                 f"({report['method']}{', asymmetric' if report['asymmetric'] else ''}, "
                 f"{report['calibration_images']} calibration images, {report['seconds']:.1f} s)")
    lines.append(f"whole model: {_flops(report['flops_before'])} -> {_flops(report['flops_after'])} FLOPs "
                 f"per image, {report['speedup_theoretical']:.2f}x theoretical speed-up")
    lines.append(f"convs only : {_flops(report['conv_flops_before'])} -> {_flops(report['conv_flops_after'])} "
                 f"FLOPs, {report['conv_speedup_theoretical']:.2f}x")
    lines.append(f"ranks      : {report.get('objective', 'flops')} objective, multiples of {report.get('rank_multiple', 1)}"
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
