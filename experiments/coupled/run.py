"""A posteriori study: a closure trained on coupled truth data, run in the loop on unseen cases.

Usage::

    python experiments/coupled/run.py [--model experiments/coupled/model/best.pt] [--skip-train]

Steps (each skips what is already complete, so an interrupted run continues):

1. ``vcnn generate --config generate.toml``: fully coupled truth cases (C_k = 0.14, frozen
   production, p = 1) for alpha = 1.0:0.1:2.0 at half the published resolution;
2. ``vcnn train --config train.toml --resume`` (alpha 1.5 validates), then ``vcnn export`` of
   its best.pt to ``--model`` unless ``--skip-train``;
3. ``vcnn simulate --config simulate.toml``: two-way, network in the loop, against the fully
   coupled PDE solution, on alpha = 0.5, 0.75, 1.45 and 3 (structured) and with
   ``simulate_unstructured.toml`` on unstructured triangles (alpha = 1.45);

then prints the a posteriori table against the goals of the study and writes it to
results/coupled/aposteriori.md; the comparison figure of alpha = 0.5 (the hardest case) is
copied to experiments/coupled/figures/ for the README.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (before dolfinx)

import argparse
import json
import shutil
from pathlib import Path

from vcnn.cli import main as vcnn_main
from vcnn.config import load_toml
from vcnn.system import machine_summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: Goals of the study: a posteriori tau error at most 1.5x the a priori one, u within 1 %,
#: integral of tau within 2 %, reattachment within 0.05 h, converged in at most 20 iterations.
GOALS = {"ratio": 1.5, "velocity": 1.0, "integral": 0.02, "reattachment": 0.05, "iterations": 20}


def table(entries: list[tuple[str, dict]]) -> str:
    header = [
        "mesh", "alpha", "points", "tau a priori %", "tau a posteriori %", "ratio", "u %",
        "integral tau err %", "body force err %", "reattachment err (h)", "outer its",
        "converged", "network-coupled s", "PDE-coupled s (its)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mesh, m in entries:
        ratio = m["tau_rel_l2_percent"] / m["a_priori_tau_rel_l2_percent"]
        reattachment = m["reattachment_x_error"]
        lines.append(
            f"| {mesh} | {m['alpha']:g} | {m['num_points']} | "
            f"{m['a_priori_tau_rel_l2_percent']:.2f} | {m['tau_rel_l2_percent']:.2f} | "
            f"{ratio:.2f} | {m['velocity_rel_l2_percent']:.3f} | "
            f"{100 * m['tau_integral_rel_error']:.2f} | {100 * m['body_force_rel_error']:.2f} | "
            f"{'' if reattachment is None else f'{reattachment:.3f}'} | {m['iterations']} | "
            f"{'yes' if m['converged'] else 'no'} | {m['wall_seconds']:.1f} | "
            f"{m['truth_wall_seconds']:.1f} ({m['truth_iterations']}) |"
        )
    return "\n".join(lines)


def goals(entries: list[tuple[str, dict]]) -> str:
    met = []
    for _, m in entries:
        reattachment = m["reattachment_x_error"]
        met.append(
            {
                "ratio": m["tau_rel_l2_percent"] <= GOALS["ratio"] * m["a_priori_tau_rel_l2_percent"],
                "velocity": m["velocity_rel_l2_percent"] <= GOALS["velocity"],
                "integral": m["tau_integral_rel_error"] <= GOALS["integral"],
                "reattachment": reattachment is None or reattachment <= GOALS["reattachment"],
                "iterations": m["converged"] and m["iterations"] <= GOALS["iterations"],
            }
        )
    return "; ".join(
        f"{name}: {sum(row[name] for row in met)}/{len(met)} cases"
        for name in ("ratio", "velocity", "integral", "reattachment", "iterations")
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / "model" / "best.pt")
    parser.add_argument("--skip-train", action="store_true", help="use --model as it is")
    args = parser.parse_args(argv)
    steps = [["generate", "--config", str(HERE / "generate.toml")]]
    if not args.skip_train:
        run = Path(load_toml(HERE / "train.toml")["train"]["out"])
        steps += [
            ["train", "--config", str(HERE / "train.toml"), "--resume"],
            ["export", "--model", str(run / "best.pt"), "--out", str(args.model)],
        ]
    outputs = {}
    for label, name in (("structured x0.5", "simulate.toml"), ("unstructured", "simulate_unstructured.toml")):
        output = Path(load_toml(HERE / name)["simulate"]["out"])
        outputs[label] = output
        steps.append(["simulate", "--config", str(HERE / name), "--model", str(args.model)])
    for step in steps:
        status = vcnn_main(step)
        if status not in (0, 1):  # 1: a case failed; its entry says why
            return status
    entries = []
    for label, output in outputs.items():
        for entry in json.loads((output / "metrics.json").read_text()):
            if entry.get("error"):
                print(f"{label} alpha {entry['alpha']}: FAILED: {entry['error']}")
                continue
            entries.append((label, entry))
    text = (
        table(entries)
        + f"\n\nGoals met: {goals(entries)}. {machine_summary()}."
    )
    print(text)
    out = ROOT / "results" / "coupled"
    out.mkdir(parents=True, exist_ok=True)
    (out / "aposteriori.md").write_text(text + "\n")
    figure = outputs["structured x0.5"] / "hill_a0.500.png"
    if figure.is_file():
        (HERE / "figures").mkdir(exist_ok=True)
        shutil.copyfile(figure, HERE / "figures" / figure.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
