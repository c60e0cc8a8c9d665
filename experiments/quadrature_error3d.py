r"""The 3-D cloud quadrature against full clouds: a priori tau errors of a 3-D model.

For every 3-D case file given (``--data``: files or folders, e.g. the held-out and transfer
cases of ``experiments/hills3d/``) and every rule (``--rule SHELLS,POLAR,AZIMUTHAL,NEIGHBOURS``,
repeatable; default the shipped rule), it predicts tau with the model (``--model``, default
``experiments/hills3d/model/best.pt``) on full clouds and on the cloud quadrature
(:mod:`vcnn.cloud_quadrature`, the numpy rule in 3-D) and prints one table: the case's points,
the mean and largest full cloud, the quadrature's entries per cloud, the relative L2 errors
against the case's tau and their difference in points, the relative L2 difference between
the two predictions, the mean ratio of the full cloud's cutoff-weighted volume (sum of c V
over its points) to the region's (the quadrature's summed weights: below 1 where walls cut
the region, far from 1 where the mesh does not resolve the cloud), the closure seconds of
each and, for scale, the case's generate time (flow and tau, from its meta). Writes
``results/quadrature_error3d/metrics.json`` and ``table.md`` and ends in a check: with the
first rule, on the cases whose meshes resolve the clouds (full / region volume within 10 % of
1; on the others a full cloud is a handful of points whose nodal volumes exceed the region,
and ``auto`` runs full clouds there), the largest |difference| within ``--tolerance`` points
(default 6, what the shipped model reaches: 5.8 points; the model before it, trained on
the cell-diameter SUPG data, reached 2.1; exit status 1 otherwise, or when no case resolves
its clouds).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python experiments/quadrature_error3d.py \\
        --data data/hills3d/s0.1x2_ck0.14_flow/hill3d_a1.125_crest0.250.npz ... \\
        [--rule 6,6,12,2] [--tolerance 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from quadrature_error import write_report

from solvers.simulate_metrics import relative_l2_percent
from vcnn.casefile import case_paths, read_case
from vcnn.closure import load_closure
from vcnn.cloud_quadrature import CloudQuadrature, QuadratureOptions
from vcnn.system import machine_summary

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "experiments" / "hills3d" / "model" / "best.pt"


def _rule(text: str) -> QuadratureOptions:
    shells, polar, azimuthal, neighbours = (int(part) for part in text.split(","))
    return QuadratureOptions(
        shells=shells, polar=polar, azimuthal=azimuthal, neighbours=neighbours
    )


def _volume_ratio(closure, case, full, rule: QuadratureOptions) -> float:
    """Mean over the points of (full cloud's sum of c V) / (quadrature's summed weights).

    ``full``: the case's full clouds (compressed rows: offsets, indices, cutoff weights).
    """
    full_mass = np.add.reduceat(full.weights * case.nodal_volume[full.indices], full.offsets[:-1])
    clouds = CloudQuadrature(
        case.points, case.velocity, case.period, case.wall_distance, closure.cloud_options,
        options=rule,
    ).clouds()
    mass = np.add.reduceat(clouds.weights.astype(np.float64), clouds.offsets[:-1])
    return float(np.mean(full_mass / mass))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="case files/folders")
    parser.add_argument("--model", default=str(MODEL), help="checkpoint")
    parser.add_argument("--rule", action="append", type=_rule,
                        help="SHELLS,POLAR,AZIMUTHAL,NEIGHBOURS (repeatable)")
    parser.add_argument("--tolerance", type=float, default=6.0, help="points of rel L2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quadrature_error3d")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rules = args.rule or [QuadratureOptions()]
    paths = [
        p for target in args.data for p in (case_paths(target) if target.is_dir() else [target])
    ]
    closure = load_closure(args.model, device="cpu")
    rows = []
    for path in paths:
        case = read_case(path)
        start = time.perf_counter()
        full = closure.predict_detailed(case, clouds="full", warn=False)
        full_seconds = time.perf_counter() - start
        full_clouds = closure.cloud_options.sampler(
            case.points, case.velocity, case.period
        ).full_clouds()
        sizes = np.diff(full_clouds.offsets)
        stages = case.meta.get("solver", {}).get("stage_seconds", {})
        solve = sum(v for k, v in stages.items() if "tau" in k or "flow" in k) or None
        for rule in rules:
            closure.quadrature_options = rule
            start = time.perf_counter()
            quadrature = closure.predict_detailed(case, clouds="quadrature", warn=False)
            seconds = time.perf_counter() - start
            row = {
                "case": f"{path.parent.name}/{case.name}", "points": case.num_points,
                "rule": rule.to_dict(3), "full_mean_points": float(sizes.mean()),
                "full_max_points": int(sizes.max()),
                "quadrature_entries_per_cloud": quadrature.num_entries / case.num_points,
                "full_rel_l2_percent": relative_l2_percent(full.tau, case.tau),
                "quadrature_rel_l2_percent": relative_l2_percent(quadrature.tau, case.tau),
                "quadrature_vs_full_percent": relative_l2_percent(quadrature.tau, full.tau),
                "full_over_region_volume": _volume_ratio(closure, case, full_clouds, rule),
                "full_seconds": full_seconds, "quadrature_seconds": seconds,
                "generate_seconds": solve,
            }
            row["difference_points"] = (
                row["quadrature_rel_l2_percent"] - row["full_rel_l2_percent"]
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| case | points | full cloud mean / max | rule S,P,K,N | entries per cloud | "
        "rel L2 % full | rel L2 % quadrature | difference (points) | quadrature vs full % | "
        "full / region volume | closure s full / quadrature | generate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rule = ",".join(str(v) for v in row["rule"].values())
        generate = "-" if row["generate_seconds"] is None else f"{row['generate_seconds']:.0f}"
        lines.append(
            f"| {row['case']} | {row['points']:,} | {row['full_mean_points']:.0f} / "
            f"{row['full_max_points']} | {rule} | {row['quadrature_entries_per_cloud']:.0f} | "
            f"{row['full_rel_l2_percent']:.2f} | {row['quadrature_rel_l2_percent']:.2f} | "
            f"{row['difference_points']:+.2f} | {row['quadrature_vs_full_percent']:.2f} | "
            f"{row['full_over_region_volume']:.2f} | "
            f"{row['full_seconds']:.2f} / {row['quadrature_seconds']:.2f} | {generate} |"
        )
    resolved = [
        row for row in rows
        if row["rule"] == rules[0].to_dict(3) and abs(row["full_over_region_volume"] - 1) <= 0.1
    ]
    worst = max((abs(row["difference_points"]) for row in resolved), default=math.inf)
    text = (
        f"3-D cloud quadrature against full clouds; {args.threads} torch threads, CPU. "
        f"{machine_summary()}.\n\n" + "\n".join(lines)
        + f"\n\nlargest |difference| of the rule "
        f"{','.join(str(v) for v in rules[0].to_dict(3).values())} on the {len(resolved)} "
        f"case(s) that resolve their clouds: {worst:.3f} points (tolerance {args.tolerance})"
    )
    print(text)
    write_report(args.out, text, {
        "rows": rows, "tolerance": args.tolerance, "worst_resolved_difference_points": worst,
        "data": [str(p) for p in paths], "model": args.model,
        "rules": [rule.to_dict(3) for rule in rules], "threads": args.threads,
    })
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
