"""Training throughput and accuracy after a fixed wall-clock budget, before and after.

Runs, one after the other on this machine, short trainings of

* the training pipeline of an earlier revision (``--baseline``, checked out in a temporary git
  worktree) with the model it shipped (its ``default`` preset, a dense DeepPot-SE embedding);
* this tree with the same dense model (``dense`` preset);
* this tree with its default model (factorised embedding, volume pooling): random batches,
  case-grouped batches with the C kernels turned off (``VCNN_KERNELS=0``: torch operations),
  and case-grouped batches (the training kernel of ``vcnn.engines.fused_rows``),

on the cases of experiment (a) (150-point clouds, the same split and seed), and prints:

* clouds per second of the training passes (``TrainResult.clouds_per_second``): the median of
  ``--rounds`` runs of ``--epochs`` epochs, the variants taken round-robin (timings on a shared
  machine drift by tens of per cent within minutes), and the peak resident memory, and
* with ``--budget-minutes B``: the best validation error after B minutes of training, each run
  given as many epochs as its own measured throughput fits in B minutes (cosine schedule
  over them) and stopped by a time limit of B minutes.

Usage::

    python experiments/bench_training.py [--data data/published_r0.5/all] [--threads 2]
        [--baseline 6b28f81] [--budget-minutes 5] [--rounds 3] [--epochs 6] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ALPHAS = [1.0 + 0.05 * k for k in range(21)]
#: This tree's settings that match the baseline's defaults (no moving average of the weights).
PLAIN = {"ema_decay": 0.0}
RUNNER = """
import json, resource, sys
from vcnn.training import TrainConfig, train
result = train(TrainConfig.from_dict(json.loads(sys.argv[1])))
print("RESULT " + json.dumps({
    "clouds_per_second": result.clouds_per_second,
    "best": result.best_validation_rel_l2_percent,
    "epochs": len(result.history),
    "seconds": result.history[-1].wall_clock_s,
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def run(tree: Path, config: dict) -> dict:
    """Train in a fresh process importing the package from ``tree``; returns its numbers.

    ``config["kernels"] = False`` runs it with the C kernels turned off (``VCNN_KERNELS=0``).
    """
    config = dict(config)
    environment = dict(os.environ, PYTHONPATH=str(tree))
    if not config.pop("kernels", True):
        environment["VCNN_KERNELS"] = "0"
    completed = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(config)],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"training in {tree} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "published_r0.5" / "all")
    parser.add_argument("--baseline", default="6b28f81", help="git revision of 'before'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="fewer clouds per epoch")
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput runs per variant (median reported)"
    )
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a throughput run")
    args = parser.parse_args(argv)
    from vcnn.system import machine_summary

    queries = 100 if args.quick else 400
    base = {
        "data": str(args.data.resolve()),
        "train_alphas": TRAIN_ALPHAS,
        "validation_alphas": [0.5],
        "validation_queries_per_case": 2000,
        "cloud_size": 150,
        "batch_size": 256,
        "queries_per_case": queries,
        "learning_rate": 2e-3,
        "scheduler": "cosine",
        "min_learning_rate": 2e-5,
        "seed": 0,
        "device": "cpu",
        "num_threads": args.threads,
    }
    variants = [
        ("before", f"{args.baseline} (its default: dense embedding)", {"preset": "default"}, {}),
        ("this tree", "dense", {"preset": "dense"}, {**PLAIN}),
        ("this tree", "default (factorised)", {"preset": "default"}, {**PLAIN}),
        (
            "this tree",
            "default (factorised), case-grouped batches, torch operations (VCNN_KERNELS=0)",
            {"preset": "default"},
            {"batch_grouping": "case", "kernels": False, **PLAIN},
        ),
        (
            "this tree",
            "default (factorised), case-grouped batches",
            {"preset": "default"},
            {"batch_grouping": "case", **PLAIN},
        ),
    ]
    start_summary = machine_summary()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        baseline_tree = scratch / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(baseline_tree), args.baseline],
            cwd=ROOT,
            check=True,
        )
        try:
            def config_of(number: int, *, epochs: int, folder: str) -> dict:
                _, _, model_table, extra = variants[number]
                return {
                    **base,
                    **extra,
                    "model": model_table,
                    "epochs": epochs,
                    "out": str(scratch / folder),
                }

            def tree_of(number: int) -> Path:
                return baseline_tree if variants[number][0] == "before" else ROOT

            rows = [
                {"code": code, "model": model, "speeds": [], "peak_mb": 0.0}
                for code, model, _, _ in variants
            ]
            # Round-robin over the variants: a slow spell of this shared machine then touches
            # every variant about alike, and the median of the rounds drops a disturbed run.
            for round_number in range(args.rounds):
                for number, row in enumerate(rows):
                    config = config_of(
                        number, epochs=args.epochs, folder=f"throughput{number}_{round_number}"
                    )
                    measured = run(tree_of(number), config)
                    row["speeds"].append(measured["clouds_per_second"])
                    row["peak_mb"] = max(row["peak_mb"], measured["peak_mb"])
                    print(
                        f"round {round_number + 1}: {row['code']} / {row['model']}: "
                        f"{measured['clouds_per_second']:.0f} clouds/s",
                        file=sys.stderr,
                    )
            for number, row in enumerate(rows):
                row["clouds_per_second"] = statistics.median(row["speeds"])
                if args.budget_minutes > 0:
                    clouds_per_epoch = queries * len(TRAIN_ALPHAS)
                    epochs = max(
                        1,
                        int(args.budget_minutes * 60 * row["clouds_per_second"] / clouds_per_epoch),
                    )
                    budget = {
                        **config_of(number, epochs=epochs, folder=f"budget{number}"),
                        "time_limit_minutes": args.budget_minutes,
                    }
                    row["budget"] = run(tree_of(number), budget)
                    print(f"{row['code']} / {row['model']}: budget run done", file=sys.stderr)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(baseline_tree)], cwd=ROOT, check=False
            )
    reference = rows[0]["clouds_per_second"]
    header = (
        f"| code | model | clouds/s (150 points, training; median of {args.rounds}) | range | "
        "speed-up | peak memory |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    if args.budget_minutes > 0:
        lines[0] += f" validation rel L2 % (alpha 0.5) after {args.budget_minutes:g} min | epochs |"
        lines[1] += "---|---|"
    for row in rows:
        line = (
            f"| {row['code']} | {row['model']} | {row['clouds_per_second']:,.0f} | "
            f"{min(row['speeds']):,.0f}-{max(row['speeds']):,.0f} | "
            f"{row['clouds_per_second'] / reference:.2f}x | {row['peak_mb']:,.0f} MB |"
        )
        if "budget" in row:
            line += f" {row['budget']['best']:.2f} | {row['budget']['epochs']} |"
        lines.append(line)
    print(
        f"Training throughput; {start_summary} at the start, {machine_summary()} at the end; "
        f"{args.threads} torch threads, batch 256, {queries} clouds per case per epoch, "
        f"{len(TRAIN_ALPHAS)} training cases; throughput runs of {args.epochs} epochs.\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
