"""Peer baselines at equal FLOPs: data-free spatial SVD and TensorLy Tucker-2, next to onnx-lowrank.

* spatial SVD (Jaderberg et al. scheme 2, what other compression toolkits ship): each k x k Conv
  becomes k x 1 (c -> r) then 1 x k (r -> d), from the truncated SVD of the kernel reshaped to
  (c k_h) x (d k_w). No data. 1 x 1 Convs cannot be split and stay unchanged.
* Tucker-2 (TensorLy ``partial_tucker`` on the output and input channel modes): 1 x 1 (c -> r_in),
  k x k core (r_in -> r_out), 1 x 1 (r_out -> d). No data.

Ranks: every compressible layer keeps the same fraction f of its FLOPs (r_in / r_out proportional
to c / d for Tucker-2), with f found by bisection so that the whole model meets the same FLOP
budget as onnx-lowrank at the target speed-up. The layers onnx-lowrank leaves unchanged because
nothing saves there (the c = 3 or c = 1 first layer) are left unchanged by the baselines too.

    python benchmarks/peer_baselines.py mnist [--speedups 2,4]
    python benchmarks/peer_baselines.py efficientnet [--speedups 1.25,1.5]   (needs .cache/efficientnet_lite0.onnx)
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, ROOT, header, markdown_table, write_result  # noqa: E402

from onnx_lowrank import CompressConfig, Compressor  # noqa: E402
from onnx_lowrank.graph.rewrite import ConvStage, pointwise_attrs, rewrite_convs  # noqa: E402
from onnx_lowrank.fidelity import evaluate  # noqa: E402
from onnx_lowrank.solver.spatial import spatial_flops, spatial_positions, spatial_svd, split_conv_attributes  # noqa: E402


def _geometry(layer, value_types):
    x_shape = value_types[layer.input][1]
    attrs = layer.attrs
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    return (x_shape[2], x_shape[3], attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]),
            attrs.get("dilations", [1, 1]))


def spatial_plan(layer, value_types, frac):
    """Rank and FLOPs for spatial SVD keeping about ``frac`` of the layer's FLOPs (None: not applicable)."""
    d, c, kh, kw = layer.weight.shape
    geo = _geometry(layer, value_types)
    if geo is None or (kh == 1 and kw == 1):
        return None
    h, w, strides, pads, dil = geo
    pv, p = spatial_positions(h, w, kh, kw, strides, pads, dil)
    per_rank = spatial_flops(c, d, kh, kw, 1, pv, p)
    original = 2 * d * c * kh * kw * p
    r = max(1, int(frac * original / per_rank))
    if r * per_rank >= original:
        return None
    return r, r * per_rank


def spatial_stages(layer, rank):
    V, H = spatial_svd(layer.weight.astype(np.float64), rank)
    geo_v, geo_h = split_conv_attributes(layer.attrs.get("strides", [1, 1]), layer.attrs.get("pads", [0, 0, 0, 0]),
                                         layer.attrs.get("dilations", [1, 1]))
    kh, kw = layer.kernel
    return [ConvStage(V, None, {**geo_v, "kernel_shape": [kh, 1], "group": 1}),
            ConvStage(H, layer.bias, {**geo_h, "kernel_shape": [1, kw], "group": 1})]


def tucker_plan(layer, value_types, frac):
    d, c, kh, kw = layer.weight.shape
    geo = _geometry(layer, value_types)
    if geo is None:
        return None
    h, w = geo[0], geo[1]
    p = layer.positions
    original = 2 * d * c * kh * kw * p

    def cost(rho):
        ri, ro = max(1, round(rho * c)), max(1, round(rho * d))
        return ri, ro, 2 * (c * ri * h * w + ri * ro * kh * kw * p + ro * d * p)

    lo, hi = 1e-4, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(mid)[2] <= frac * original:
            lo = mid
        else:
            hi = mid
    ri, ro, fl = cost(lo)
    if fl >= original:
        return None
    return (ri, ro), fl


def tucker_stages(layer, ranks):
    from tensorly.decomposition import partial_tucker

    ri, ro = ranks
    (core, (u_out, u_in)), _ = partial_tucker(layer.weight.astype(np.float64), rank=[ro, ri], modes=[0, 1],
                                              init="svd", random_state=0)
    attrs = {k: v for k, v in layer.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    attrs.update(kernel_shape=list(layer.kernel), group=1)
    return [ConvStage(u_in.T[:, :, None, None], None, pointwise_attrs()),
            ConvStage(core, None, attrs),
            ConvStage(u_out[:, :, None, None], layer.bias, pointwise_attrs())]


def baseline_model(comp: Compressor, budget: float, plan_fn, stages_fn, movable: set[str]):
    """Find the common FLOP fraction that meets ``budget`` and build the rewritten model."""
    layers = [lay for lay in comp.layers if lay.name in movable]
    total = sum(comp.flops.values())

    def total_at(frac):
        saved, plans = 0, {}
        for lay in layers:
            pl = plan_fn(lay, comp.value_types, frac)
            if pl is not None:
                plans[lay.name] = pl
                saved += comp.flops[lay.name] - pl[1]
        return total - saved, plans

    lo, hi = 1e-4, 1.0
    if total_at(lo)[0] > budget:
        return None, None
    for _ in range(40):
        mid = (lo + hi) / 2
        if total_at(mid)[0] <= budget:
            lo = mid
        else:
            hi = mid
    after, plans = total_at(lo)
    by_name = {lay.name: lay for lay in layers}
    model = rewrite_convs(comp.model, {n: stages_fn(by_name[n], pl[0]) for n, pl in plans.items()})
    return model, total / after


def data_for(which):
    if which == "mnist":
        demo = ROOT / "models" / "mnist_vgg"
        with np.load(demo / "heldout.npz") as z:
            x, labels = z["input"], z["label"]
        return str(demo / "mnist_vgg.onnx"), str(demo / "calib.npz"), {"input": x}, labels
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import photo_crops

    model = CACHE / "efficientnet_lite0.onnx"
    if not model.exists():
        raise SystemExit("run benchmarks/export_efficientnet_lite0.py first")

    def prep(a):
        return ((a.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()

    import onnx

    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    return str(model), {name: prep(photo_crops(256, seed=1))}, {name: prep(photo_crops(500, seed=2))}, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["mnist", "efficientnet"])
    ap.add_argument("--speedups", default=None)
    args = ap.parse_args()
    speedups = [float(s) for s in (args.speedups or ("2,4" if args.model == "mnist" else "1.25,1.5")).split(",")]
    model, calib, evalx, labels = data_for(args.model)
    comp = Compressor(model, calib, CompressConfig(objective="flops", rank_multiple=1))
    batches = [{k: v[i:i + 250] for k, v in evalx.items()} for i in range(0, len(next(iter(evalx.values()))), 250)]
    rows = []
    total = sum(comp.flops.values())
    for s in speedups:
        for label, kwargs in (("onnx-lowrank nonlinear+asym", {"method": "nonlinear", "asymmetric": True}),
                              ("onnx-lowrank linear (PCA)", {"method": "linear", "asymmetric": False})):
            res = comp.run(speedup=s, **kwargs)
            movable = {lay["name"] for lay in res.report["layers"] if lay["break_even_rank"]}
            rows.append(_row(s, label, res.model, res.report["speedup_theoretical"], comp, batches, labels))
        for label, plan_fn, stages_fn in (("spatial SVD (data-free)", spatial_plan, spatial_stages),
                                          ("Tucker-2 (TensorLy, data-free)", tucker_plan, tucker_stages)):
            m, achieved = baseline_model(comp, total / s, plan_fn, stages_fn, movable)
            if m is None:
                rows.append({"speedup": s, "method": label, "theoretical": float("nan"), "note": "budget unreachable"})
                continue
            rows.append(_row(s, label, m, achieved, comp, batches, labels))
        for r in rows[-4:]:
            print(r, flush=True)
    out = RESULTS / f"peer_baselines_{args.model}.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    cols = ["target", "method", "theoretical x", "top-1 agreement", "logit NMSE"] + (["accuracy %"] if labels is not None else [])
    table = markdown_table(cols, [[f"{r['speedup']:g}x", r["method"], f"{r['theoretical']:.2f}",
                                   _f(r.get("agreement"), ".4f"), _f(r.get("nmse"), ".3g")]
                                  + ([_f(r.get("accuracy"), ".2f")] if labels is not None else []) for r in rows])
    md = header(f"Peer baselines at equal FLOPs: {args.model}") + (
        "Same model, same evaluation data, same whole-model FLOP budget per row group; the baselines use no "
        "calibration data. Spatial SVD leaves 1x1 Convs unchanged (nothing to split), so it must cut the k x k "
        "layers harder to meet the same budget.\n\n" + table + "\n" + NOTES.get(args.model, ""))
    write_result(f"peer_baselines_{args.model}", md)


NOTES = {"efficientnet": ("\nOn EfficientNet-Lite0 every compressible Conv but the 3x3 stem is 1x1: spatial SVD has only the stem to cut and cannot reach the budget (`nan`), and a data-free Tucker-2 of 1x1 weights (1x1 -> 1x1 core -> 1x1) at the same FLOPs destroys the network (agreement 0). Calibration: 256 photo crops (seed 1), 10 positions each; layers with more than 1025 channels were fitted symmetrically (too few samples for asymmetric regression, see the tool's warning). Evaluation: 500 crops (seed 2).\n")}


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def _row(s, label, model, achieved, comp, batches, labels):
    ev = evaluate(comp.source_model, model, batches, labels=labels)
    r = {"speedup": s, "method": label, "theoretical": achieved, "agreement": ev.get("top1_agreement"),
         "nmse": ev["nmse"]}
    if labels is not None:
        r["accuracy"] = 100 * ev["accuracy_candidate"]
    return r


if __name__ == "__main__":
    main()
