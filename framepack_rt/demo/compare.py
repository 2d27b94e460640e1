"""Compare two evaluation reports turn by turn: is model B's fidelity better than model A's on the same turns?

    python -m framepack_rt.demo.evaluate --model demo --runs 0 --drift-seconds 0 --no-diagnostics \\
        --fidelity-runs 32 --fidelity-seed 10256 --json a.json
    python -m framepack_rt.demo.evaluate --model runs/h4w --size 96 --runs 0 --drift-seconds 0 --no-diagnostics \\
        --fidelity-runs 32 --fidelity-seed 10256 --json b.json
    python -m framepack_rt.demo.compare a.json b.json

Turns differ far more from each other than two models differ on one turn, so the difference is taken per turn
(paired: B - A on each seed) and its standard error is that of the mean of those differences. This is how
TRAINING.md's "paired against ... (SE)" columns are computed. Both reports must hold the same seeds; the sizes may
differ (a fidelity scene puts the ball at the same fraction of the side at every size).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from framepack_rt.demo.fidelity import JUMP_LIMIT, turns_over

RATES = ("intact", "one_object", "colour_ok", "area_ok")


def fidelity_of(report: dict, name: str = "report") -> dict:
    """The fidelity part of an evaluate --json report, or an error that says how to get one."""
    fidelity = report.get("fidelity")
    if not fidelity or not fidelity.get("details"):
        raise ValueError(f"{name} has no fidelity turns: run python -m framepack_rt.demo.evaluate with "
                         "--fidelity-runs N --json FILE")
    return fidelity


def paired(a: dict, b: dict, key: str = "intact") -> dict:
    """B - A of ``key`` on each seed of two fidelity reports: the mean difference, its standard error, the turn
    count and how many turns B won and lost. The reports must cover the same seeds."""
    rows_a = {d["seed"]: d for d in a["details"]}
    rows_b = {d["seed"]: d for d in b["details"]}
    if rows_a.keys() != rows_b.keys():
        only_a, only_b = sorted(rows_a.keys() - rows_b.keys()), sorted(rows_b.keys() - rows_a.keys())
        raise ValueError(f"the reports cover different turns (seeds only in A: {only_a[:5]}, only in B: "
                         f"{only_b[:5]}): evaluate both with the same --fidelity-seed and --fidelity-runs")
    seeds = sorted(rows_a)
    diff = np.array([rows_b[s][key] - rows_a[s][key] for s in seeds], np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"key": key, "turns": len(diff), "mean": float(diff.mean()), "se": se,
            "b_better": int((diff > 0).sum()), "b_worse": int((diff < 0).sum())}


def median_jump(fidelity: dict) -> float:
    """The median over turns of each turn's largest jump across gaps (turns without one left out)."""
    jumps = [j for j in (d["largest_jump_across_gaps"] for d in fidelity["details"]) if not math.isnan(j)]
    return float(np.median(jumps)) if jumps else float("nan")


def compare(a: dict, b: dict) -> dict:
    """Every measure of two fidelity reports side by side, the rates paired turn by turn."""
    return {"turns": len(a["details"]),
            "seeds": [min(d["seed"] for d in a["details"]), max(d["seed"] for d in a["details"])],
            "rates": {key: {"a": a[key], "b": b[key], "paired": paired(a, b, key)} for key in RATES},
            "intact_per_section": {"a": a["intact_per_section"], "b": b["intact_per_section"]},
            "turns_over": {"a": turns_over(a["details"]), "b": turns_over(b["details"])},
            "median_jump": {"a": median_jump(a), "b": median_jump(b)}}


def table(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as lines of text."""
    first, last = result["seeds"]
    lines = [f"{result['turns']} turns, seeds {first:,}-{last:,}; A = {name_a}, B = {name_b}",
             f"{'measure':<28}{'A':>8}{'B':>8}{'B - A (SE)':>18}{'turns B +/-':>14}"]
    for key, r in result["rates"].items():
        p = r["paired"]
        lines.append(f"{key:<28}{r['a']:>8.1%}{r['b']:>8.1%}{100 * p['mean']:>+11.1f} ({100 * p['se']:.1f})"
                     f"{p['b_better']:>8}/{p['b_worse']}")
    per_a, per_b = (" ".join(f"{100 * v:.0f}" for v in result["intact_per_section"][k]) for k in ("a", "b"))
    lines.append(f"{'intact per section':<28}A {per_a} | B {per_b}")
    over, jump = result["turns_over"], result["median_jump"]
    lines.append(f"{f'turns with a jump > {JUMP_LIMIT}':<28}{over['a']:>8}{over['b']:>8}")
    lines.append(f"{'median turn largest jump':<28}{jump['a']:>8.3f}{jump['b']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m framepack_rt.demo.compare", description=__doc__.split("\n")[0])
    p.add_argument("a", help="the baseline's evaluate --json report")
    p.add_argument("b", help="the candidate's report, over the same fidelity seeds")
    p.add_argument("--json", default=None, help="also write the comparison here")
    args = p.parse_args(argv)
    try:
        a, b = (fidelity_of(json.loads(Path(f).read_text()), f) for f in (args.a, args.b))
        result = compare(a, b)
    except (OSError, ValueError) as e:  # a missing file, not JSON, no fidelity part, other seeds
        p.error(str(e))
    print(table(result, args.a, args.b))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
