"""Experiment (a), a priori: the trained model on the validation and test slope factors.

Usage: python experiments/published/evaluate.py [--model runs/published_cpu/best.pt]
    [--data data/published_r0.5/all] [--full-alphas ALPHA ...]

Every test case is evaluated with 150-point clouds (as in training) and with full clouds
(every point of each ellipse; deterministic; --full-alphas restricts these). Prints a
Markdown table and writes it, with metrics.json and figures, under results/published/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vcnn.closure import load_closure
from vcnn.datasets import discover_cases, select_by_alpha
from vcnn.evaluation import evaluate
from vcnn.system import machine_summary

TEST_ALPHAS = (0.5, 0.75, 1.075, 1.275, 1.475, 1.675, 1.875, 2.25, 2.5, 3.0, 3.5, 4.0)
#: Published relative L2 errors (docs/physics.md): training data and alpha = 0.5.
PUBLISHED = {"training": 0.41, 0.5: 3.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/published_cpu/best.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/published_r0.5/all"))
    parser.add_argument("--out", type=Path, default=Path("results/published"))
    parser.add_argument("--full-alphas", type=float, nargs="*", default=list(TEST_ALPHAS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    metadata = load_closure(args.model, device="cpu").metadata
    sources = select_by_alpha(discover_cases(args.data), list(TEST_ALPHAS))
    start = time.perf_counter()
    sampled = evaluate(args.model, sources, args.out / "n150", cloud_size=150, device=args.device)
    sampled_seconds = time.perf_counter() - start
    full_sources = select_by_alpha(sources, list(args.full_alphas))
    start = time.perf_counter()
    full = evaluate(args.model, full_sources, args.out / "full", device=args.device)
    full_seconds = time.perf_counter() - start
    full_by_alpha = {m.alpha: m for m in full}
    rows = [
        "| alpha | split | points | rel L2 % (n = 150) | rel L2 % (full clouds) | "
        "integral rel error (full or 150) | inputs out of range % (full) | "
        "full-cloud prediction s | published rel L2 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in sampled:
        split = "validation" if m.alpha == 0.5 else "test"
        best = full_by_alpha.get(m.alpha, m)
        full_text = f"{full_by_alpha[m.alpha].rel_l2_percent:.2f}" if m.alpha in full_by_alpha else ""
        rows.append(
            f"| {m.alpha:g} | {split} | {m.num_points} | {m.rel_l2_percent:.2f} | {full_text} | "
            f"{best.integral_rel_error:.2e} | {100 * best.out_of_range_fraction:.2g} | "
            f"{best.seconds:.2f} | {PUBLISHED.get(m.alpha, '')} |"
        )
    best = metadata.get("best", {})
    history = (args.model.parent / "lcurve.tsv").read_text().splitlines()
    last = dict(zip(history[0].split("\t"), history[-1].split("\t"), strict=True))
    footer = (
        f"\nTraining: {last['epoch']} epochs (best.pt from epoch {best.get('epoch')}), "
        f"{float(last['wall_clock_s']) / 60:.1f} min wall-clock, final training rel L2 "
        f"{float(last['train_rel_l2_percent']):.2f} % on 150-point clouds (published: "
        f"{PUBLISHED['training']} % on training data); seed {metadata['seed']}. Evaluation: "
        f"{sampled_seconds:.0f} s for the 150-point pass, {full_seconds:.0f} s for the "
        f"full-cloud pass. {machine_summary()}."
    )
    text = "\n".join(rows) + "\n" + footer
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(
        json.dumps({"n150": [m.__dict__ for m in sampled], "full": [m.__dict__ for m in full]},
                   indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
