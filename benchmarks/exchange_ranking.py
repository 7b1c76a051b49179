"""Do short-schedule fits rank exchanges like the real fits? (issue 15, ``--allocation refined``)

One Compressor (the demo MNIST model, or the PP-OCRv4 recogniser as in benchmarks/allocation.py);
``--allocation refined`` run twice at the same target: the marginals
(each movable layer's damage decrease one rank step up, increase one step down, measured end to end on the
held-back calibration images) from fits with the real schedule, then with a short one
(``exchange_schedule``). Reports the rank correlation of the two sets of marginals, the first round's
proposals in each order, the moves taken, the held-back damage reached, the solves and evaluations.

    python benchmarks/exchange_ranking.py demo --speedup 6 --rank-multiple 1
    python benchmarks/exchange_ranking.py ppocr_rec --speedup 1.5 --objective latency

Writes ``benchmarks/results/exchange_ranking_<model>_<speedup>x_m<multiple>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocation  # noqa: E402
import common  # noqa: E402

SHORT = ((5, 0.01), (5, 1.0))


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(allocation.SETUPS))
    ap.add_argument("--objective", default="flops")
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--eval", type=int, default=1)
    ap.add_argument("--speedup", type=float, default=6.0)
    ap.add_argument("--rank-multiple", type=int, default=1)
    ap.add_argument("--tries", type=int, default=4)
    args = ap.parse_args()
    from onnx_lowrank import CompressConfig, Compressor

    model, data = allocation.SETUPS[args.model](args)[:2]
    comp = Compressor(model, data, CompressConfig(speedup=args.speedup, objective=args.objective, threads=1,
                                                  rank_multiple=args.rank_multiple))
    runs = {}
    for label, schedule in (("real", None), ("short", SHORT)):
        rep = comp.run(allocation="refined", exchange_schedule=schedule, exchange_tries=args.tries).report
        runs[label] = rep["exchanges"]
    real, short = runs["real"], runs["short"]
    names = list(real["marginals"])
    rows, corr = [], {}
    for j, what in enumerate(("up gain", "down loss")):
        both = [n for n in names if real["marginals"][n][j] is not None and short["marginals"][n][j] is not None]
        corr[what] = spearman([real["marginals"][n][j] for n in both], [short["marginals"][n][j] for n in both])
    for n in names:
        rows.append([n, *(("-" if v is None else f"{v:.3g}") for v in real["marginals"][n]),
                     *(("-" if v is None else f"{v:.3g}") for v in short["marginals"][n])])
    md = common.header(f"Exchange ranking: real vs short fits, {args.model}, {args.speedup:g}x {args.objective}, "
                       f"rank multiple {args.rank_multiple}")
    md += (f"Short schedule {list(SHORT)}; real: the compress schedule. Damage: {real['metric']} of the outputs on "
           f"{real['held_back_images']} held-back calibration images; --threads 1; machine shared with other jobs.\n\n")
    md += common.markdown_table(["layer", "up gain (real)", "down loss (real)", "up gain (short)",
                                 "down loss (short)"], rows) + "\n\n"
    md += ", ".join(f"Spearman {k}: **{v:.2f}**" for k, v in corr.items()) + "\n\n"
    for label, ex in runs.items():
        first = [t["move"] for t in ex["tried"][0]] if ex["tried"] else []
        md += (f"- {label}: first round's proposals in order: {'; '.join(first) or 'none'}; taken: "
               f"{'; '.join(t['move'] for t in ex['taken']) or 'none'}; held-back damage "
               f"{ex['damage_before']:.4g} -> {ex['damage_after']:.4g}; {ex['solves']} solves, "
               f"{ex['evaluations']} evaluations, {ex['seconds']:.1f} s\n")
    name = f"exchange_ranking_{args.model}_{args.speedup:g}x_m{args.rank_multiple}"
    common.write_result(name, md)
    (common.RESULTS / f"{name}.json").write_text(json.dumps({"runs": runs, "spearman": corr}, indent=1,
                                                            default=str))


if __name__ == "__main__":
    main()
