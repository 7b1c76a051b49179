"""What benchmarks/recover.py's cases share: running a recovery, its table's first columns, the
interleaved latency bench, the cached compression at a FLOP or measured target, and the section for a
target out of reach."""

from __future__ import annotations

import json
import time

import numpy as np

from benchmarks import common
from onnx_lowrank.calibration.batching import input_specs
from onnx_lowrank.calibration.inputs import open_source
from onnx_lowrank.compressor import Compressor
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.recover import RecoverConfig, recover_models


def run_recovery(original, factorised, calib: dict, cfg: RecoverConfig):
    source = open_source(calib, input_specs(factorised))
    t0 = time.perf_counter()
    res = recover_models(original, factorised, source, cfg)
    return res, time.perf_counter() - t0


#: The first columns of every recovery table: the setting and what early stopping saw (in the loss
#: trained, and as output NMSE, which compares across losses).
LEAD = ["loss", "seed", "lr", "augment", "train", "epochs run", "epoch kept", "held-back loss before -> after",
        "held-back NMSE after"]


def lead(r: dict) -> list:
    return [r["loss"], r["seed"], r["lr"], r["augment"], r["train"], r["epochs_run"], r["epoch_kept"],
            f"{r['held_back_before']:.4f} -> {r['held_back_after']:.4f}", f"{r['held_back_nmse_after']:.4f}"]


def loss_fields(spec: str) -> dict:
    """'nmse' or 'kl:T' as RecoverConfig fields."""
    name, _, t = spec.partition(":")
    return {"loss": name, "temperature": float(t)} if t else {"loss": name}


def bench_ratio(original, compressed, feed: dict, min_runs: int, also=()) -> dict:
    """Measured latency of original vs compressed (and the models in ``also``), batch 1, 1 thread,
    interleaved: rounds until each speed-up's median is known within 2 % at 95 % confidence (at least
    ``min_runs`` rounds, at most 120 s). ``also``'s ratios come back under "also"."""
    from onnx_lowrank.measure import bench

    b = bench([original, compressed, *also], feed, threads=1, warmup=5, min_runs=min_runs, max_seconds=120.0)
    spread = b["speedup_spread"][1]
    return {"original_ms": b["models"][0]["median_ms"], "compressed_ms": b["models"][1]["median_ms"],
            "speedup": b["speedup"][1], "spread": spread, "rounds": b["rounds"], "stable": b["stable"],
            "also": [{"ms": b["models"][i]["median_ms"], "speedup": b["speedup"][i],
                      "spread": b["speedup_spread"][i]} for i in range(2, 2 + len(also))]}


def ci_text(lat: dict) -> str:
    """The measured speed-up's 95 % interval, as bench reports it."""
    lo, hi = lat["spread"]["ci95"]
    return f"95 % interval {lo:.2f}x .. {hi:.2f}x" if lo is not None and hi is not None else "no interval"


def recover_rows(original, factorised, calib: dict, evaluate, args, models: list | None = None) -> list[dict]:
    """One row per (augment, lr, loss, seed); ``models`` gets each recovered model when given."""
    rows = []
    for aug in args.augments.split(";"):
        for lr in [float(v) for v in args.lrs.split(",")]:
            for spec, seed in [(sp, int(sd)) for sp in args.losses.split(",") for sd in str(args.seed).split(",")]:
                cfg = RecoverConfig(epochs=args.epochs, lr=lr, augment=aug, seed=seed, patience=args.patience,
                                    train=args.train, time_limit=args.time_limit, batch_size=args.batch_size,
                                    warmup=args.warmup, **loss_fields(spec))
                res, secs = run_recovery(original, factorised, calib, cfg)
                rep = res.report
                rows.append({"loss": spec, "seed": seed, "lr": lr, "augment": aug, "train": args.train,
                             "epoch_kept": rep["epoch_kept"], "epochs_run": len(rep["epochs"]) - 1,
                             "held_back_before": rep["held_back_loss_before"],
                             "held_back_after": rep["held_back_loss_after"],
                             "held_back_nmse_after": rep["held_back_nmse_after"], "seconds": secs,
                             "epochs": rep["epochs"], **evaluate(res.model)})
                if models is not None:
                    models.append(res.model)
                print({k: v for k, v in rows[-1].items() if k != "epochs"}, flush=True)
    return rows


def target_text(info: dict, args) -> str:
    """The compression's target as the reports word it, from :func:`cached_target_compression`'s info."""
    if args.objective == "latency":
        return (f"{args.speedup}x measured latency (--objective latency, --threads {args.threads}, ranks multiples "
                f"of {info['rank_multiple']}; the tool's whole-model check predicted {info['predicted']:.2f}x)")
    return f"{args.speedup}x FLOPs (ranks multiples of {info['rank_multiple']})"


def write_refusal(name: str, title: str, what: str, err, args) -> None:
    """The section for a target out of reach: the tool's message and its bound."""
    md = common.header(f"{title}, rank multiple {args.rank_multiple or 'default'}: target out of reach")
    md += (f"{args.calib} {what}, --objective {args.objective}, --threads {args.threads}, "
           f"--rank-multiple {args.rank_multiple or 'default'}: the compression refused the target. "
           f"The tool's message: {err}. Highest reachable speed-up: **{err.max_speedup:.2f}x**.\n")
    common.write_result(name, md)
    (common.RESULTS / f"{name}.json").write_text(json.dumps(
        {"target": args.speedup, "objective": args.objective, "threads": args.threads,
         "rank_multiple": args.rank_multiple, "max_speedup": err.max_speedup, "before": err.flops_before,
         "smallest": err.min_flops, "unit": err.unit, "message": str(err)}, indent=1))


def cached_target_compression(prefix: str, model_path, input_name: str, calib: np.ndarray, args):
    """The factorised model from .cache/, made once per objective, target, threads, rank multiple and
    number of calibration inputs (with --objective latency the compression times layers: run it alone on
    the machine). Raises RankSelectionError, with the tool's bound, when the target is out of reach."""
    import onnx

    multiple = args.rank_multiple or (1 if args.objective == "flops" else CompressConfig().rank_multiple)
    path = common.CACHE / (f"{prefix}_{args.objective}_{args.speedup:g}x_t{args.threads}_m{multiple}_"
                           f"{args.calib}.onnx")
    side = path.with_suffix(".json")
    if not path.exists():
        t0 = time.perf_counter()
        fact = Compressor(str(model_path), {input_name: calib}, CompressConfig(
            speedup=args.speedup, objective=args.objective, threads=args.threads, rank_multiple=multiple)).run()
        info = {"speedup_theoretical": fact.report["speedup_theoretical"], "seconds": time.perf_counter() - t0,
                "predicted": fact.report.get("predicted_latency_speedup") or float("nan"), "rank_multiple": multiple}
        common.CACHE.mkdir(exist_ok=True)
        onnx.save(fact.model, str(path))
        side.write_text(json.dumps(info))
    return onnx.load(str(path)), json.loads(side.read_text())


def removed_share(orig: float, before: float, after: float) -> float:
    """Share of the loss (before - orig) that recovery removed; 1 = all of it."""
    return (before - after) / (before - orig) if before != orig else float("nan")
