"""Fidelity of a candidate model against a reference on the same inputs (``evaluate``): top-1 agreement,
top-5 overlap, NMSE, KL divergence, and the accuracy of both when labels are given."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import LowRankError
from .measure import _feed_for, _progress_bar, _run, _session

_PROB_EPS = 1e-12


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(np.all(x >= 0.0) and np.all(x <= 1.0) and np.allclose(x.sum(axis=1), 1.0, rtol=0.0, atol=1e-3))


def _kl_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """KL(p_r || p_c) per row; logits go through log-softmax, probabilities are used as they are."""
    if _looks_like_probabilities(r) and _looks_like_probabilities(c):
        p = r
        log_p = np.log(np.clip(r, _PROB_EPS, None))
        log_q = np.log(np.clip(c, _PROB_EPS, None))
    else:
        log_p = _log_softmax(r)
        log_q = _log_softmax(c)
        p = np.exp(log_p)
    kl = np.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=1)
    return np.maximum(kl, 0.0)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-x, k - 1, axis=1)[:, :k]


def evaluate(
    reference_path: str,
    candidate_path: str,
    feeds: Iterable[dict[str, np.ndarray]],
    labels: np.ndarray | None = None,
    output: str | None = None,
    progress: bool = False,
) -> dict:
    """How far the candidate's output drifts from the reference's on the same batches.

    Always reports NMSE and max |diff|; for a classifier output (N, K), K >= 2, also top-1
    agreement, top-5 overlap and KL divergence, and with ``labels`` the accuracy of both.
    """
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise LowRankError(
                f"labels must be a 1-D array of integer class ids, got shape {labels.shape} dtype {labels.dtype}"
            )
    ref_sess = _session(reference_path)
    cand_sess = _session(candidate_path)
    ref_outputs = [o.name for o in ref_sess.get_outputs()]
    cand_outputs = [o.name for o in cand_sess.get_outputs()]
    name = output if output is not None else ref_outputs[0]
    for path, names in ((reference_path, ref_outputs), (candidate_path, cand_outputs)):
        if name not in names:
            raise LowRankError(f"{path} has no output named {name!r}; its outputs are {', '.join(names)}")

    samples = 0
    batches = 0
    err_sq = 0.0
    ref_sq = 0.0
    max_abs = 0.0
    classifier: bool | None = None
    top1_hits = 0
    top5_sum = 0.0
    kl_sum = 0.0
    ref_correct = 0
    cand_correct = 0
    with _progress_bar(progress, None, "eval", unit="sample") as bar:
        for feed in feeds:
            (r,) = _run(ref_sess, reference_path, _feed_for(ref_sess, reference_path, feed), [name])
            (c,) = _run(cand_sess, candidate_path, _feed_for(cand_sess, candidate_path, feed), [name])
            if not isinstance(r, np.ndarray) or not isinstance(c, np.ndarray):
                raise LowRankError(f"output {name!r} is not a tensor; choose a tensor output with output=")
            if r.shape != c.shape:
                raise LowRankError(
                    f"output {name!r} has shape {r.shape} in {reference_path} but {c.shape} in {candidate_path}; "
                    f"the models must produce the same output"
                )
            r = r.astype(np.float64)
            c = c.astype(np.float64)
            n = int(r.shape[0]) if r.ndim else 1
            is_clf = r.ndim == 2 and r.shape[1] >= 2
            if classifier is None:
                classifier = is_clf
                if labels is not None and not classifier:
                    raise LowRankError(
                        f"labels need a classifier output of shape (N, K), but {name!r} has shape {r.shape}; "
                        f"pick the logits output with output="
                    )
            elif classifier != is_clf:
                raise LowRankError(f"output {name!r} changes rank across batches; feed batches of one shape")
            batches += 1
            diff = c - r
            err_sq += float(np.sum(diff * diff))
            ref_sq += float(np.sum(r * r))
            if diff.size:
                max_abs = max(max_abs, float(np.max(np.abs(diff))))
            if is_clf and n:
                ra = r.argmax(axis=1)
                ca = c.argmax(axis=1)
                top1_hits += int(np.sum(ra == ca))
                k = min(5, r.shape[1])
                tr, tc = _top_k(r, k), _top_k(c, k)
                top5_sum += float(np.sum((tr[:, :, None] == tc[:, None, :]).sum(axis=(1, 2)) / k))
                kl_sum += float(np.sum(_kl_rows(r, c)))
                if labels is not None:
                    if samples + n > len(labels):
                        raise LowRankError(
                            f"got {len(labels)} labels but the feeds hold more samples; give one label per sample"
                        )
                    y = labels[samples : samples + n]
                    ref_correct += int(np.sum(ra == y))
                    cand_correct += int(np.sum(ca == y))
            samples += n
            bar.update(n)

    if batches == 0:
        raise LowRankError("no input batches to evaluate; give at least one feed")
    if labels is not None and len(labels) != samples:
        raise LowRankError(f"got {len(labels)} labels for {samples} samples; give exactly one label per sample")

    if ref_sq > 0:
        nmse = err_sq / ref_sq
    else:
        nmse = 0.0 if err_sq == 0 else float("inf")
    result: dict[str, Any] = {"samples": samples, "output": name, "nmse": nmse, "max_abs_diff": max_abs}
    if classifier and samples:
        result["top1_agreement"] = top1_hits / samples
        result["top5_overlap"] = top5_sum / samples
        result["kl_divergence"] = kl_sum / samples
        if labels is not None:
            acc_r = ref_correct / samples
            acc_c = cand_correct / samples
            result["accuracy_reference"] = acc_r
            result["accuracy_candidate"] = acc_c
            result["accuracy_drop_points"] = 100.0 * (acc_r - acc_c)
    return result
