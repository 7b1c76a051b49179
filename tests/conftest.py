"""Hermetic latency cache: layer timings go to one temporary folder for the whole session, never ~/.cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory):
    old = os.environ.get("ONNX_LOWRANK_CACHE")
    os.environ["ONNX_LOWRANK_CACHE"] = str(tmp_path_factory.mktemp("latency-cache"))
    yield
    if old is None:
        os.environ.pop("ONNX_LOWRANK_CACHE", None)
    else:
        os.environ["ONNX_LOWRANK_CACHE"] = old
