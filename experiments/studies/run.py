"""Studies (b) and (c): cloud size and symmetry.

Usage:
    python experiments/studies/run.py cloud-size     # (b) n = 1, 25, 150 and full clouds
    python experiments/studies/run.py symmetry       # (c) VCNN vs a non-invariant baseline

Both train on the half-resolution cases of experiment (a) (``data/published_r0.5/all``, made
by the commands in ``experiments/published/generate_*.toml``) with a reduced CPU budget
(STUDY_BUDGET below, the same for every model of a study). Each prints a Markdown table and
writes it to results/studies/<study>.md. Transfer to other meshes and codes is
experiments/transfer/run.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vcnn.closure import load_closure
from vcnn.config import load_toml, merge
from vcnn.datasets import CaseSource, discover_cases, select_by_alpha
from vcnn.evaluation import predict_case
from vcnn.symmetry import random_orthogonal
from vcnn.system import machine_summary
from vcnn.training import TrainConfig, train

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE.parent / "published" / "train_cpu.toml"
#: The reduced training budget shared by every model of a study.
STUDY_BUDGET = {
    "epochs": 10,
    "queries_per_case": 500,
    "validation_queries_per_case": 1500,
    "num_threads": 1,
}
EVAL_ALPHAS = (0.5, 1.475, 3.0)


def train_variant(name: str, out: Path, overrides: dict) -> tuple[Path, float]:
    """Train one model of a study (resumes a finished run instantly); returns (best.pt, s)."""
    table = merge(load_toml(BASE_CONFIG)["train"], {**STUDY_BUDGET, **overrides})
    if "model" in overrides:  # another kind of network: its table replaces the base one
        table["model"] = dict(overrides["model"])
    table["out"] = str(out / name)
    table["resume"] = True
    table.pop("time_limit_minutes", None)
    # a weight average over ~500 steps would lag the few hundred steps of a study budget
    table["ema_decay"] = 0.0
    start = time.perf_counter()
    result = train(TrainConfig.from_dict(table))
    return result.best_checkpoint, time.perf_counter() - start


def eval_sources(data: Path, alphas) -> list[CaseSource]:
    return select_by_alpha(discover_cases(data), list(alphas))


def rel_l2(checkpoint: Path, sources, *, cloud_size, frame=None) -> list[float]:
    closure = load_closure(checkpoint, device="cpu")
    return [
        predict_case(closure, source, cloud_size=cloud_size, frame=frame).metrics.rel_l2_percent
        for source in sources
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cloud_size_study(data: Path, out: Path) -> str:
    sources = eval_sources(data, EVAL_ALPHAS)
    rows = []
    for n in (1, 25, 150):
        checkpoint, seconds = train_variant(f"n{n}", out, {"cloud_size": n})
        for inference in (n, None) if n == 150 else (n,):
            errors = rel_l2(checkpoint, sources, cloud_size=inference)
            rows.append(
                [str(n), "full" if inference is None else str(inference)]
                + [f"{e:.2f}" for e in errors]
                + [f"{np.mean(errors):.2f}", f"{seconds:.0f}"]
            )
    header = ["trained n", "inference n"] + [f"rel L2 % a={a:g}" for a in EVAL_ALPHAS]
    return table(header + ["mean", "train s"], rows)


def symmetry_study(data: Path, out: Path, frames: int = 4) -> str:
    sources = eval_sources(data, EVAL_ALPHAS)
    rng = np.random.default_rng(0)
    rotations = [
        random_orthogonal(2, determinant=(1 if k % 2 == 0 else -1), rng=rng)
        for k in range(frames)
    ]
    models = {
        "VCNN (default)": {"cloud_size": 150},
        "baseline (raw coordinates)": {"cloud_size": 150, "model": {"kind": "BaselineNet"}},
    }
    rows = []
    for label, overrides in models.items():
        name = "n150" if label.startswith("VCNN") else "baseline"
        checkpoint, _ = train_variant(name, out, overrides)
        training_frame = rel_l2(checkpoint, sources, cloud_size=150)
        rotated = np.array([rel_l2(checkpoint, sources, cloud_size=150, frame=r) for r in rotations])
        rows.append(
            [label, "training frame"] + [f"{e:.2f}" for e in training_frame]
        )
        rows.append(
            [label, f"{frames} random frames (worst)"]
            + [f"{e:.2f}" for e in rotated.max(axis=0)]
        )
    header = ["model", "frame"] + [f"rel L2 % a={a:g}" for a in EVAL_ALPHAS]
    return table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=["cloud-size", "symmetry"])
    parser.add_argument("--data", type=Path, default=Path("data/published_r0.5/all"))
    parser.add_argument("--out", type=Path, default=Path("runs/studies"))
    parser.add_argument("--results", type=Path, default=Path("results/studies"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.study == "cloud-size":
        text = cloud_size_study(args.data, args.out)
    else:
        text = symmetry_study(args.data, args.out)
    footer = (
        f"\n\n{machine_summary()}; study wall-clock {time.perf_counter() - start:.0f} s; "
        f"training budget per model: {STUDY_BUDGET}; inference n = 150 unless stated."
    )
    print(text + footer)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.study}.md").write_text(text + footer + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
