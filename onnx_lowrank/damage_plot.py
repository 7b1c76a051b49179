"""PNG of each layer's measured accuracy cost against the cost it saves (``--allocation sensitivity``).

One line per layer through its measured ranks (x: FLOPs or ms saved, y: damage added), the chosen rank
marked: the allocation picks points where damage per saving is cheapest, so the picture shows at a
glance which layers carry the cut and why.
"""

from __future__ import annotations

from pathlib import Path

from .costs import COST_MODELS
from .files import save_figure


def damage_plot(report: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = COST_MODELS[report["objective"]].unit if report.get("objective") in COST_MODELS else "FLOPs"
    layers = [lay for lay in report["layers"] if lay.get("damage_by_rank") and lay.get("saving_by_rank")]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    floor = 1e-9
    for lay in layers:
        ranks = sorted(int(r) for r in lay["saving_by_rank"] if int(r) in _ints(lay["damage_by_rank"]))
        if not ranks:
            continue
        dmg = _ints(lay["damage_by_rank"])
        sav = _ints(lay["saving_by_rank"])
        xs = [sav[r] for r in ranks]
        ys = [max(dmg[r], floor) for r in ranks]
        line, = ax.plot(xs, ys, "o-", ms=3, lw=1, label=lay["name"][-28:])
        if lay["rank"] is not None and lay["rank"] in sav:
            ax.plot([sav[lay["rank"]]], [max(lay["damage"], floor)], "*", ms=12, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"{unit} saved")
    ax.set_ylabel("damage to the outputs (" + report.get("damage_metric", "") + ", log)")
    ax.set_title(title or "accuracy cost against saving per layer (stars: chosen ranks)")
    ax.grid(alpha=0.3)
    if len(layers) <= 20:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def _ints(d: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in d.items()}
