"""Cost models: what ``--speedup`` counts. ``COST_MODELS`` maps ``--objective`` values to them (base.py)."""

from .base import REPORT_KEYS, CostModel, Costs
from .flops import FlopModel
from .latency import LatencyModel

COST_MODELS: dict[str, CostModel] = {m.name: m for m in (LatencyModel(), FlopModel())}

__all__ = ["COST_MODELS", "REPORT_KEYS", "CostModel", "Costs"]
