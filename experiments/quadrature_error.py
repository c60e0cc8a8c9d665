"""The cloud quadrature against full clouds: a priori tau errors of the shipped models.

For every case file given (``--data``: files or folders, e.g. the alpha = 0.5, 1, 2, 4 hills of
``vcnn generate --alphas 0.5 1 2 4 --resolution 0.5``, with ``--c-k 0.14`` for the coupled
model's physics) and every model (``--model``, repeatable; default the two shipped ones), it
predicts tau with full clouds and with the cloud quadrature (:mod:`vcnn.cloud_quadrature`) and
prints the relative L2 errors against the case's tau, their difference in points and the
relative L2 difference between the two predictions, with the seconds of each. Writes
``results/quadrature_error/metrics.json`` and ends in a check: every difference of errors
within ``--tolerance`` points (default 0.2, the goal at alpha = 1; the exit status is 1
otherwise).

Usage::

    python experiments/quadrature_error.py --data data/hills_r0.5 [--model published]
        [--tolerance 0.2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from solvers.simulate_metrics import relative_l2_percent
from vcnn.casefile import case_paths, read_case
from vcnn.closure import load_closure
from vcnn.system import machine_summary

ROOT = Path(__file__).resolve().parents[1]


def write_report(out: Path, text: str, metrics: dict) -> None:
    """``metrics.json`` (noted as deterministic: no seed) and ``table.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(
        {**metrics, "seed": None,
         "note": "deterministic: full clouds and the quadrature use no random numbers"},
        indent=2) + "\n")
    (out / "table.md").write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="case files/folders")
    parser.add_argument("--model", action="append", help="checkpoint or shipped model name")
    parser.add_argument("--tolerance", type=float, default=0.2, help="points of rel L2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quadrature_error")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.model or ["published", "coupled"]
    paths = [p for target in args.data for p in (case_paths(target) if target.is_dir() else [target])]
    rows = []
    for model in models:
        closure = load_closure(model, device="cpu")
        for path in paths:
            case = read_case(path)
            row = {"model": model, "case": case.name, "alpha": case.meta.get("alpha"),
                   "points": case.num_points}
            predictions = {}
            for mode in ("full", "quadrature"):
                start = time.perf_counter()
                predictions[mode] = closure.predict(case, clouds=mode)
                row[f"{mode}_seconds"] = time.perf_counter() - start
                row[f"{mode}_rel_l2_percent"] = relative_l2_percent(predictions[mode], case.tau)
            row["difference_points"] = row["quadrature_rel_l2_percent"] - row["full_rel_l2_percent"]
            row["quadrature_vs_full_percent"] = relative_l2_percent(
                predictions["quadrature"], predictions["full"]
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| model | case | points | rel L2 % full | rel L2 % quadrature | difference (points) | "
        "quadrature vs full % | seconds full / quadrature |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['case']} | {row['points']:,} | "
            f"{row['full_rel_l2_percent']:.3f} | {row['quadrature_rel_l2_percent']:.3f} | "
            f"{row['difference_points']:+.3f} | {row['quadrature_vs_full_percent']:.3f} | "
            f"{row['full_seconds']:.2f} / {row['quadrature_seconds']:.2f} |"
        )
    worst = max(abs(row["difference_points"]) for row in rows)
    text = (
        f"Cloud quadrature against full clouds; {args.threads} torch threads, CPU. "
        f"{machine_summary()}.\n\n" + "\n".join(lines)
        + f"\n\nlargest |difference|: {worst:.3f} points (tolerance {args.tolerance})"
    )
    print(text)
    write_report(args.out, text, {
        "rows": rows, "tolerance": args.tolerance, "worst_difference_points": worst,
        "data": [str(p) for p in paths], "models": models,
    })
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
