"""Calibration data that Python code hands over: readers, reader factories and iterables of feed dicts.

Nothing here lists the data: each pass asks the source for one feed dict at a time, checks it
against the model's inputs and hands it on, so memory holds the batch being built and no more.
Calibration reads the data several times (shapes, sampling, the asymmetric pass), so a source must
be readable again: a list, an object whose ``__iter__`` starts afresh, a ``CalibrationDataReader``
with ``rewind()`` (onnxruntime's convention) or a function that returns a new reader or iterable.
A one-shot generator or iterator is refused up front with that advice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ..errors import LowRankError
from .inputs import FeedSource, InputSpec, _batch_len, _check_feed, _note_ignored

AGAIN = ("calibration reads the data several times: give the reader a rewind() method, or pass a function "
         "that returns a new reader (e.g. lambda: MyReader(...))")


def stream_source(data, inputs: list[InputSpec], role: str = "calibration") -> FeedSource:
    if hasattr(data, "get_next"):   # onnxruntime.quantization.CalibrationDataReader
        return _reader_source(data, inputs, role)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return _sequence_source(data, inputs, role)
    if isinstance(data, Iterable):
        if iter(data) is data:
            raise LowRankError(f"the {role} data is a one-shot {type(data).__name__}, but {role} reads the data "
                               "several times: pass a list, or a function that returns a new iterator "
                               "(e.g. lambda: make_batches())")
        desc = "iterable of feed dicts"
        return _pass_source(lambda continuing: iter(data), _checker(inputs, desc, role), desc)
    if callable(data):
        return _factory_source(data, inputs, role)
    raise LowRankError(f"cannot use {type(data).__name__} as {role} data: give a path, a dict of arrays, "
                       "an iterable of feed dicts, a CalibrationDataReader or a function returning one")


def _checker(inputs: list[InputSpec], desc: str, role: str, note: bool = True):
    """Checks one feed dict; notes arrays for no model input once per source (``note``)."""
    noted: set = set()

    def check(f) -> dict:
        if not isinstance(f, dict):
            raise LowRankError(f"the {desc} gave a {type(f).__name__}, expected a dict of input name -> array")
        f = _check_feed({k: np.asarray(v) for k, v in f.items()}, inputs, desc, role)
        if note and set(f) - noted - {i.name for i in inputs}:
            _note_ignored({k: None for k in f if k not in noted}, inputs, desc, role)
            noted.update(f)
        return {i.name: f[i.name] for i in inputs}

    return check


def _sequence_source(feeds: Sequence, inputs: list[InputSpec], role: str) -> FeedSource:
    """A list already in memory: checked and counted at once (cheap), read again as often as needed."""
    desc = "iterable of feed dicts"
    _note_ignored({k: None for f in feeds if isinstance(f, dict) for k in f}, inputs, desc, role)
    check = _checker(inputs, desc, role, note=False)
    checked = [check(f) for f in feeds]
    if sum(_batch_len(f) for f in checked) == 0:
        raise LowRankError(f"the {desc} gave no samples")
    return FeedSource(lambda: iter(checked), desc, sum(_batch_len(f) for f in checked), in_memory=True)


def _pass_source(open_pass, check, desc: str, first: dict | None = None) -> FeedSource:
    """``open_pass(continuing)`` starts one pass (an iterator of feed dicts). ``first``: a checked feed
    already read (to find an empty source at once); the first pass hands it out, then goes on
    (``continuing=True``) with the rest."""
    state = {"first": first}

    def make_iter() -> Iterator[dict]:
        head, state["first"] = state["first"], None
        it = open_pass(head is not None)
        if head is not None:
            yield head
            del head
        for f in it:
            yield check(f)

    return FeedSource(make_iter, desc)


def _first(it: Iterator, check, desc: str) -> dict:
    first = next(it, None)
    if first is None or _batch_len(check(first)) == 0:
        raise LowRankError(f"the {desc} gave no samples")
    return check(first)


def _reader_source(reader, inputs: list[InputSpec], role: str) -> FeedSource:
    desc = "CalibrationDataReader"
    check = _checker(inputs, desc, role)
    first = _first(iter(reader.get_next, None), check, desc)

    def open_pass(continuing: bool) -> Iterator[dict]:
        if not continuing:
            _rewind(reader)
        return iter(reader.get_next, None)

    return _pass_source(open_pass, check, desc, first)


def _rewind(reader) -> None:
    rewind = getattr(reader, "rewind", None)
    if rewind is None:
        raise LowRankError(f"the CalibrationDataReader {type(reader).__name__} has no rewind(): {AGAIN}")
    try:
        rewind()
    except NotImplementedError:
        raise LowRankError(f"the CalibrationDataReader {type(reader).__name__} cannot rewind(): {AGAIN}") from None


def _factory_source(factory, inputs: list[InputSpec], role: str) -> FeedSource:
    """A function returning a fresh reader or iterable for every pass."""
    desc = f"{role} data function"

    def fresh() -> Iterator[dict]:
        made = factory()
        if hasattr(made, "get_next"):
            return iter(made.get_next, None)
        if isinstance(made, Iterable) and not isinstance(made, (str, bytes, dict)):
            return iter(made)
        raise LowRankError(f"the {desc} returned a {type(made).__name__}: it must return a "
                           "CalibrationDataReader or an iterable of feed dicts")

    check = _checker(inputs, desc, role)
    opened = fresh()
    first = _first(opened, check, desc)
    state = {"opened": opened}

    def open_pass(continuing: bool) -> Iterator[dict]:
        it, state["opened"] = state["opened"], None
        return it if continuing and it is not None else fresh()

    return _pass_source(open_pass, check, desc, first)
