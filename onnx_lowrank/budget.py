"""Accuracy budgets for CI: evaluate a compressed model and fail when it costs too much.

A budget is checked on held-out data against the original model (``--max-accuracy-drop``
with labels, or ``--min-agreement`` on top-1 predictions). ``--speedup auto`` searches for the
largest speed-up whose model stays within the budget, reusing one calibration pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import progress
from .calibration.inputs import load_npz, open_source
from .errors import BudgetExceeded, LowRankError
from .fidelity import evaluate
from .solver.ranks import RankSelectionError


@dataclass
class Budget:
    data: object                          # .npz / .npy / image folder path, or a dict of arrays
    labels: str | None = None             # name of the label array in the .npz
    max_accuracy_drop: float | None = None  # percentage points
    min_agreement: float | None = None    # fraction of top-1 predictions equal to the original's
    output: str | None = None             # model output to compare (default: the first)
    batch: int = 64
    preprocess: object = None             # ImagePreprocess for image folders (as for calibration)
    _inputs: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def inputs(self, specs) -> tuple[list[dict], np.ndarray | None]:
        """Evaluation batches and labels, read once and reused by every trial of a search or sweep."""
        if self._inputs is None:
            feeds, labels = evaluation_inputs(specs, self.data, self.labels, self.batch, preprocess=self.preprocess)
            self._inputs = (list(feeds), labels)
        return self._inputs

    def check_model(self, model) -> None:
        """Refuse up front a budget that needs class scores when the compared output cannot hold them."""
        if not (self.labels or self.min_agreement is not None) or not model.graph.output:
            return
        outputs = {o.name: o for o in model.graph.output}
        name = self.output or model.graph.output[0].name
        tt = outputs[name].type.tensor_type if name in outputs else None
        if tt is None or not tt.HasField("shape"):
            return   # unknown until it runs: evaluation checks it then
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(dims) != 2 or (dims[1] is not None and dims[1] < 2):
            what = "--labels" if self.labels else "--min-agreement"
            shape = "x".join("N" if d is None else str(d) for d in dims)
            raise LowRankError(f"{what} needs a classifier output of shape (N, classes), but the model's output "
                               f"{name!r} has shape {shape}")

    @property
    def has_limits(self) -> bool:
        return self.max_accuracy_drop is not None or self.min_agreement is not None

    def __post_init__(self):
        # A negative or NaN limit can never be met: refuse it before minutes of compression end in exit 3.
        if self.max_accuracy_drop is not None:
            if not self.labels:
                raise LowRankError("--max-accuracy-drop needs --labels KEY naming the label array in the evaluation .npz")
            if not math.isfinite(self.max_accuracy_drop) or self.max_accuracy_drop < 0:
                raise LowRankError(f"--max-accuracy-drop is a number of percentage points, 0 or more, "
                                   f"not {self.max_accuracy_drop}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise LowRankError(f"--min-agreement is a fraction between 0 and 1, not {self.min_agreement}")


def evaluation_inputs(specs, data, labels: str | None, batch: int, limit: int | None = None, preprocess=None):
    """Batches of feeds and the label array (split off the .npz when ``labels`` names it).

    Everything is checked here, before any model runs: the inputs against the model's, and the
    labels as one integer class id per sample.
    """
    label_array = None
    if labels:
        arrays = dict(_npz_arrays(data))
        if labels not in arrays:
            raise LowRankError(f"--labels {labels!r} is not an array in {data} (it has {', '.join(arrays)})")
        label_array = np.asarray(arrays.pop(labels))
        data = arrays
    source = open_source(data, specs, preprocess, role="evaluation")
    if label_array is not None:
        if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
            raise LowRankError(f"--labels {labels!r} must be a 1-D array of integer class ids, "
                               f"not shape {list(label_array.shape)} dtype {label_array.dtype}")
        if len(label_array) != source.total():
            raise LowRankError(f"--labels {labels!r} has {len(label_array)} labels for {source.total()} "
                               "evaluation samples: give one label per sample")
        if limit is not None:
            label_array = label_array[:limit]
    return source.batches(batch, limit), label_array


def _npz_arrays(data) -> dict:
    if isinstance(data, dict):
        return data
    if not Path(data).exists():
        raise LowRankError(f"evaluation data not found: {data}")
    if Path(data).suffix != ".npz":
        raise LowRankError("--labels needs a .npz holding the inputs and the label array")
    return load_npz(Path(data))


def evaluate_against(reference, candidate, specs, budget: Budget) -> dict:
    feeds, labels = budget.inputs(specs)
    with progress.bar("evaluation", sum(len(next(iter(f.values()))) for f in feeds), "img") as update:
        return evaluate(reference, candidate, _counted(feeds, update), labels=labels, output=budget.output)


def _counted(feeds, update):
    for f in feeds:
        yield f
        update(len(next(iter(f.values()))))


def violation(ev: dict, budget: Budget) -> str | None:
    """A one-line description of how the budget is broken, or None if it holds."""
    problems = []
    if budget.max_accuracy_drop is not None:
        drop = ev["accuracy_drop_points"]
        if drop > budget.max_accuracy_drop:
            problems.append(f"accuracy drop {drop:.2f} points exceeds --max-accuracy-drop "
                            f"{budget.max_accuracy_drop:g} by {drop - budget.max_accuracy_drop:.2f} points "
                            f"({100 * ev['accuracy_reference']:.2f}% -> {100 * ev['accuracy_candidate']:.2f}%)")
    if budget.min_agreement is not None:
        if "top1_agreement" not in ev:
            raise LowRankError("--min-agreement needs a classifier output (N, classes); use --max-accuracy-drop")
        agree = ev["top1_agreement"]
        if agree < budget.min_agreement:
            problems.append(f"top-1 agreement {agree:.4f} is below --min-agreement {budget.min_agreement:g} "
                            f"by {budget.min_agreement - agree:.4f}")
    return "; ".join(problems) or None


def search_speedup(compressor, specs, budget: Budget, start: float = 1.5, growth: float = 1.5,
                   refine_steps: int = 3, max_speedup: float = 64.0, finish=None):
    """Largest speed-up within the budget: grow geometrically until it breaks, then bisect (in log).

    Returns ``(result, evaluation, trials)`` for the best passing speed-up; raises BudgetExceeded
    when even a 1.1x compression breaks the budget. ``finish`` (e.g. recovery) is applied to each
    compressed model before it is judged.
    """
    trials = []
    best = None

    def attempt(s: float):
        nonlocal best
        try:
            res = compressor.run(speedup=s)
        except RankSelectionError:
            trials.append({"speedup": s, "status": "unreachable"})
            return None
        if finish is not None:
            res = finish(res)
        ev = evaluate_against(compressor.source_model, res.model, specs, budget)
        bad = violation(ev, budget)
        trials.append({"speedup": s, "speedup_theoretical": res.report["speedup_theoretical"],
                       "status": "fails" if bad else "passes", **_summary(ev)})
        progress.log(f"  --speedup {s:.3g}: {'fails: ' + bad if bad else 'within budget'}")
        if bad is None and (best is None or s > best[0]):
            best = (s, res, ev)
        return bad is None

    lo, hi = None, None
    s = start
    while s <= max_speedup:
        ok = attempt(s)
        if ok:
            lo = s
            s *= growth
        else:
            hi = s
            break
    if lo is None:
        for s in (1.25, 1.1):
            if attempt(s):
                lo = s
                break
        if lo is None:
            raise BudgetExceeded(f"no speed-up of 1.1x or more stays within the budget ({trials[-1].get('status')}); "
                                 "nothing was written")
        hi = hi or start
    if hi is not None:
        for _ in range(refine_steps):
            mid = math.sqrt(lo * hi)
            if attempt(round(mid, 3)):
                lo = round(mid, 3)
            else:
                hi = mid
    _, res, ev = best
    return res, ev, trials


def _summary(ev: dict) -> dict:
    keys = ("top1_agreement", "accuracy_candidate", "accuracy_drop_points", "nmse")
    return {k: ev[k] for k in keys if k in ev}
