"""The Python API: compress with an accuracy budget, the same call the ``compress`` command makes.

The command line only turns its options into arguments of :func:`compress` and its exceptions
into exit codes, so a script gets every behaviour of the CLI: the budget check, ``speedup="auto"``,
the measured speed-up, and the model and report written together or not at all.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .budget import Budget, evaluate_against, search_speedup, violation
from .errors import BudgetExceeded, LowRankError
from .files import check_writable, json_default, write_together
from .graph import loading
from .graph.external import has_big_tensors, has_external_data, uses_external_data
from .graph.loading import model_writer
from .calibration.batching import input_specs
from .compressor import CompressionResult, Compressor
from .config import CompressConfig, with_overrides


def compress(model, data, output: str | Path | None = None, config: CompressConfig | None = None, *,
             eval_data=None, labels: str | None = None, max_accuracy_drop: float | None = None,
             min_agreement: float | None = None, eval_output: str | None = None, write_failed: bool = False,
             report: str | Path | None = None, measure: bool = False,
             on_result: Callable[[CompressionResult], None] | None = None, samples=None, shards: int | None = None,
             executor: str = "local", workers: int | None = None, recover=None, **overrides) -> CompressionResult:
    """Compress ``model`` (path or ModelProto) with calibration ``data``; write ``output`` (and ``report``) if given.

    ``data``: a .npz / .npy path, a folder of images, a dict of arrays, an iterable of feed dicts
    or an onnxruntime ``CalibrationDataReader``. Keyword overrides set fields of
    :class:`CompressConfig`; ``speedup`` may also be ``"auto"``.

    With ``eval_data`` the result is evaluated against the original on held-out inputs
    (``report["evaluation"]``); ``labels`` names the label array in that .npz. A budget
    (``max_accuracy_drop`` in percentage points, needs ``labels``; ``min_agreement``, a fraction
    of top-1 predictions equal to the original's) is recorded in ``report["budget"]``; when it is
    broken :class:`BudgetExceeded` is raised and nothing is written, unless ``write_failed``
    (then both are written before it is raised). ``speedup="auto"`` searches for the largest
    speed-up within the budget (``report["search"]`` lists the tries). ``measure`` times the
    original and compressed models into the report. ``on_result`` is called with the result
    before anything is written (the CLI prints its table there). ``recover`` (a number of epochs or a
    :class:`~onnx_lowrank.recover.RecoverConfig`) distils each compressed model towards the original on
    the calibration data before it is evaluated (``report["recovery"]``; needs the ``recover`` extra).

    ``samples``: paths of samples files from ``onnx-lowrank calibrate`` (one whole calibration, or all
    parts of a sharded one, merged) used instead of a calibration pass; ``data`` is still read by the
    asymmetric pass. ``shards``: calibrate in that many image ranges on ``executor`` ("local" worker
    processes or "ray" tasks, ``workers`` at a time); the result is the same as in one process.

    Everything that can be checked is checked before calibration: budget values, output paths,
    the evaluation data and labels.
    """
    speedup = overrides.get("speedup", (config or CompressConfig()).speedup)
    auto = isinstance(speedup, str) and speedup == "auto"
    if isinstance(model, (str, Path)) and not Path(model).exists():
        raise LowRankError(f"model file not found: {model} (check the path)")
    recovery = _recovery(recover, overrides.get("seed", (config or CompressConfig()).seed))
    budget = _budget(eval_data, labels, max_accuracy_drop, min_agreement, eval_output, auto)
    if auto:
        overrides["speedup"] = None
    cfg = with_overrides(config, overrides)
    if budget is not None:
        budget.preprocess = cfg.preprocess
    _check_outputs(model, output, report)
    source_model = loading.load_model(model) if isinstance(model, (str, Path)) else model
    if budget:   # the evaluation data and the output it is compared on, checked before any work
        budget.check_model(source_model)
        budget.inputs(input_specs(source_model))
    if samples is not None:
        from .calibration.samples import load_parts

        samples = load_parts([samples] if isinstance(samples, (str, Path)) else list(samples))
    elif shards is not None and shards > 1:
        from .shards import calibrate

        samples = calibrate(source_model, data, cfg, shards, executor, workers)
    compressor = Compressor(source_model, data, cfg, samples=samples)
    finish = recovery(compressor) if recovery else None
    broken = None
    if auto:
        result, ev, trials = search_speedup(compressor, input_specs(compressor.model), budget, finish=finish)
        result.report["search"] = trials
    else:
        result = compressor.run()
        if finish:
            result = finish(result)
        ev = evaluate_against(compressor.source_model, result.model, input_specs(compressor.model), budget) \
            if budget else None
        broken = violation(ev, budget) if budget else None
    if measure:
        measure_speedup(compressor, result, cfg.threads)
    if ev is not None:
        result.report["evaluation"] = ev
        if budget.has_limits:
            result.report["budget"] = {"max_accuracy_drop": max_accuracy_drop, "min_agreement": min_agreement,
                                       "passed": broken is None}
    external = uses_external_data(result.model) or has_external_data(compressor.source_model)
    if external and has_big_tensors(result.model):
        # over the size limit or loaded with external data: written as OUT plus OUT.data (graph/external.py)
        result.report["external_data"] = f"{Path(output).name}.data" if output is not None else True
    if on_result is not None:
        on_result(result)
    if broken and not write_failed:
        raise BudgetExceeded(f"budget broken: {broken}; nothing was written (--write-failed keeps the model)",
                             result=result)
    if output is not None:
        # Model and report appear together or not at all.
        write_together([(output, model_writer(result.model, external))]
                       + ([(report, lambda tmp: _write_json(tmp, result.report))] if report else []))
    if broken:
        raise BudgetExceeded(f"budget broken: {broken} (written anyway because of --write-failed)",
                             result=result, written=output is not None)
    return result


def _recovery(recover, seed: int):
    """A step that recovers each compressed model (see onnx_lowrank.recover), checked before any work."""
    if not recover:
        return None
    from .recover import RecoverConfig, recover_models, require_torch

    require_torch()
    rcfg = recover if isinstance(recover, RecoverConfig) else RecoverConfig(epochs=int(recover), seed=seed)
    rcfg.check()

    def for_compressor(compressor: Compressor):
        def finish(result: CompressionResult) -> CompressionResult:
            rec = recover_models(compressor.source_model, result.model, compressor.source,
                                 replace(rcfg, max_images=rcfg.max_images or compressor.limit))
            result.model = rec.model
            result.report["recovery"] = rec.report
            return result
        return finish
    return for_compressor


def _budget(eval_data, labels, max_accuracy_drop, min_agreement, eval_output, auto: bool) -> Budget | None:
    if labels and eval_data is None:
        raise LowRankError("--labels names the label array in --eval-data: give --eval-data too")
    budget = None
    if eval_data is not None or max_accuracy_drop is not None or min_agreement is not None:
        if eval_data is None:
            raise LowRankError("a budget needs --eval-data: held-out inputs to compare against the original model")
        budget = Budget(eval_data if isinstance(eval_data, dict) else str(eval_data), labels, max_accuracy_drop,
                        min_agreement, output=eval_output)
    if auto and (budget is None or not budget.has_limits):
        raise LowRankError("--speedup auto needs a budget: --eval-data with --max-accuracy-drop or --min-agreement")
    return budget


def _check_outputs(model, output, report) -> None:
    """Refuse, before loading anything, outputs that would overwrite the input or cannot be written."""
    if output is None:
        if report is not None:
            raise LowRankError("a report is written beside the model: give an output path too")
        return
    if isinstance(model, (str, Path)) and Path(output).resolve() == Path(model).resolve():
        raise LowRankError("--output is the input model: choose another path (the input is never modified)")
    if report is not None and Path(report).resolve() in (Path(output).resolve(),) + \
            ((Path(model).resolve(),) if isinstance(model, (str, Path)) else ()):
        raise LowRankError("--report would overwrite a model file: give it its own path, e.g. report.json")
    check_writable(output, "--output")
    if report is not None:
        check_writable(report, "--report")


#: ``--measure``'s time cap, unless its first 10 rounds take longer (``bench`` allows 60 s): compressing is the job.
MEASURE_SECONDS = 15.0


def measure_speedup(compressor: Compressor, result: CompressionResult, threads: int | None) -> dict:
    """Bench original vs compressed into the report, predicted beside it: interleaved rounds until the
    median per-round speed-up is stable (runtime.timing), with its spread. Returns the ``bench`` result."""
    from .measure import bench

    b = bench([compressor.model, result.model], compressor.timing_feed(), threads=threads, warmup=1,
              max_seconds=MEASURE_SECONDS)
    spread = b["speedup_spread"][1]
    rep = result.report
    rep["latency_measured"] = {"original_ms": b["models"][0]["median_ms"], "compressed_ms": b["models"][1]["median_ms"],
                               "runs": b["rounds"], "threads": threads, "speedup_iqr": spread["iqr"],
                               "speedup_ci95": spread["ci95"], "stable": b["stable"]}
    rep["measured_latency_speedup"] = b["speedup"][1]
    if rep.get("predicted_latency_speedup"):
        for key, speedup in (("latency_prediction_error", "predicted_latency_speedup"),
                             ("latency_table_error", "table_latency_speedup")):
            rep[key] = b["speedup"][1] / rep[speedup] - 1
    return b


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=json_default)
        f.write("\n")
