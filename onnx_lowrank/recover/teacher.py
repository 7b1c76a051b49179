"""The teacher: the original model run by onnxruntime on the (possibly augmented) calibration inputs.

No torch here: the targets are NumPy arrays, and the data they are computed on is read once into
memory and split into fit and held-back images the way the solver splits them.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from ..calibration.inputs import FeedSource
from ..runtime import CALIBRATION, run, session
from ..errors import LowRankError


class Teacher:
    """Targets for ``outputs`` (tensor names) from ``model``; intermediate tensors become graph outputs."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str], threads: int | None = None):
        present = {o.name for o in model.graph.output}
        extra = [n for n in outputs if n not in present]
        if extra:
            model = copy.deepcopy(model)
            for name in extra:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        self.outputs = outputs
        self.session = session(model, CALIBRATION, threads)

    def __call__(self, feed: dict[str, np.ndarray], batch: int = 32) -> list[np.ndarray]:
        n = len(next(iter(feed.values())))
        parts = [run(self.session, self.outputs, {k: v[i:i + batch] for k, v in feed.items()})
                 for i in range(0, n, batch)]
        return [np.concatenate([p[j] for p in parts]).astype(np.float32) for j in range(len(self.outputs))]


def choose_outputs(original: onnx.ModelProto, factorised: onnx.ModelProto, names: list[str] | None) -> list[str]:
    """The tensors the loss compares: ``names``, or every float graph output. Each must exist in both models."""
    if not names:
        names = [o.name for o in factorised.graph.output
                 if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, 0)]
        if not names:
            raise LowRankError("the model has no float output to recover: name the tensors with --outputs")
        return names
    for model, what in ((original, "original"), (factorised, "factorised")):
        known = {o.name for o in model.graph.output} | {t for n in model.graph.node for t in n.output}
        missing = [n for n in names if n not in known]
        if missing:
            raise LowRankError(f"--outputs {', '.join(missing)} is not a tensor of the {what} model "
                               "(give graph outputs or tensors both models compute)")
    return list(names)


def load_all(source: FeedSource, limit: int | None = None) -> dict[str, np.ndarray]:
    """Every calibration sample in memory, one array per input (recovery makes many passes)."""
    feeds = list(source.batches(64, limit))
    if not feeds:
        raise LowRankError("the calibration data holds no samples")
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def split(arrays: dict[str, np.ndarray], holdout_every: int) -> tuple[dict, dict]:
    """Fit and held-back samples: every ``holdout_every``-th is held back, as the solver does."""
    n = len(next(iter(arrays.values())))
    held = np.arange(n) % holdout_every == holdout_every - 1
    if held.sum() == 0 or (~held).sum() == 0:
        raise LowRankError(f"recovery needs at least {holdout_every} calibration samples: one in "
                           f"{holdout_every} is held back for early stopping, and {n} were given")
    return {k: v[~held] for k, v in arrays.items()}, {k: v[held] for k, v in arrays.items()}
