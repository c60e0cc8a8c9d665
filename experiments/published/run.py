"""Experiment (a) end to end in one command: generate the cases, train, evaluate.

Usage:
    python experiments/published/run.py          # full length: published resolution, GPU config
    python experiments/published/run.py --cpu    # the CPU run behind the README table

Steps (each skips what is already complete, so an interrupted run continues):
1. ``vcnn generate`` with generate_train.toml and generate_test.toml (the --cpu run at half
   resolution into data/published_r0.5/all);
2. ``vcnn train`` with train.toml (train_cpu.toml with --cpu), resuming from last.pt;
3. experiments/published/evaluate.py on the validation and test slope factors.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from vcnn.cli import main as vcnn_main
from vcnn.config import load_toml

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="half resolution, CPU budget")
    args = parser.parse_args(argv)
    train_config = HERE / ("train_cpu.toml" if args.cpu else "train.toml")
    train_table = load_toml(train_config)["train"]
    data = Path(train_table["data"])
    resolution = ["--resolution", "0.5"] if args.cpu else []
    for part in ("train", "test"):
        status = vcnn_main(
            ["generate", "--config", str(HERE / f"generate_{part}.toml"), "--out", str(data),
             *resolution]
        )
        if status != 0:
            return status
    status = vcnn_main(["train", "--config", str(train_config), "--resume"])
    if status != 0:
        return status
    spec = importlib.util.spec_from_file_location("evaluate_published", HERE / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    return evaluate.main(
        ["--model", str(Path(train_table["out"]) / "best.pt"), "--data", str(data)]
    )


if __name__ == "__main__":
    raise SystemExit(main())
