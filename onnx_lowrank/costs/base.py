"""What a cost model is: what ``--speedup`` counts, and how ranks are chosen to reach it.

A :class:`CostModel` is registered in ``COST_MODELS`` (``__init__``) under its ``--objective``
name. For one model and configuration it makes a :class:`Costs` (measuring what it needs, once),
which chooses the ranks and fills its part of the report.
"""

from __future__ import annotations

#: Report keys a cost model fills (None where it has nothing to say).
REPORT_KEYS = ("latency_original_ms", "latency_table_ms", "table_latency_speedup", "latency_predicted_ms",
               "predicted_latency_speedup", "latency_checks", "latency_table", "latency_environment")


class Costs:
    """The costs of one model's layers under one configuration."""

    #: The measured timings as a latency table (costs/table.py), for cost models that measure.
    table = None

    def choose(self, free: list, spectra: list, fixed: dict[int, int], fixed_flops: int, total_flops: int,
               cfg, damage: dict[str, dict[int, float]] | None = None) -> list[int | None]:
        """A rank (None: kept whole) for each free plan, to reach ``cfg.speedup``; ``fixed``: hand-set ranks by index.

        The allocator ``cfg.allocation`` (solver/allocation.py) shares the budget; ``damage``: the measured
        tables ``{layer name: {rank: damage}}`` an allocator that needs them chooses from."""
        raise NotImplementedError

    def savings(self, p, cfg) -> dict[int, float]:
        """``{rank: cost saved}`` of one candidate plan at each of its candidate ranks (for the damage plot)."""
        return {}

    def layer_times(self, free: list, ranks: list[int | None], fixed: dict[int, int], cfg) -> list | None:
        """``(before, after)`` ms per free plan at ``ranks``, or None where this model times nothing."""
        return None

    def kept_reason(self, p, cfg) -> str | None:
        """Why a candidate is kept whole, where the cost model is the reason."""
        return None

    def report(self, plan: list, cfg) -> dict:
        return dict.fromkeys(REPORT_KEYS)


class CostModel:
    """Registered under :attr:`name` (the ``--objective`` value)."""

    name = ""
    #: One line for ``--help``.
    help = ""
    #: What its costs count (axis labels).
    unit = ""
    #: Its costs are measured (``Costs.table``): workers of a sweep are given them instead of measuring.
    measures = False

    def key(self, cfg) -> tuple:
        """The fields of the configuration its costs depend on: a Compressor measures once per key."""
        return ()

    def costs(self, compressor, plan: list, cfg) -> Costs:
        """Measure (or load) what the compressor's model costs; called before calibration."""
        raise NotImplementedError
