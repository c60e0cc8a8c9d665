"""The quick end-to-end pipeline behind ``make demo``.

1. ``generate``: small periodic-hill cases with the FEniCSx solver (alpha in TRAIN, VALIDATION,
   TEST);
2. ``train``: a vector-cloud network on the training cases, early-stopped on validation;
3. ``evaluate``: the a-priori error on the unseen test slope factors, with full clouds;

then prints the error table and where the figures are, and checks the test error against a
tolerance (exit code 1 when it is not met). ``--quick`` is a smaller version that the test
suite runs.

Usage: python -m vcnn.demo [--out results/demo] [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from vcnn.cli import configure_logging
from vcnn.cli import main as vcnn_main

logger = logging.getLogger("vcnn.demo")

TRAIN_ALPHAS = (0.8, 1.0, 1.3, 1.6)
VALIDATION_ALPHAS = (1.15,)
TEST_ALPHAS = (1.45, 1.9)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo: the full one (``make demo``) or the quick one (tests)."""

    resolution: float
    epochs: int
    queries_per_case: int
    #: the check: mean relative L2 error (%) on the test cases must be below this
    tolerance_percent: float


FULL = DemoSettings(resolution=0.2, epochs=40, queries_per_case=1200, tolerance_percent=10.0)
QUICK = DemoSettings(resolution=0.1, epochs=4, queries_per_case=200, tolerance_percent=40.0)


def run_demo(out: Path, settings: DemoSettings, *, device: str = "auto", seed: int = 0) -> float:
    """Run the pipeline into ``out``; returns the mean test relative L2 error in percent."""
    import json

    start = time.perf_counter()
    data = out / "cases"
    alphas = [*TRAIN_ALPHAS, *VALIDATION_ALPHAS, *TEST_ALPHAS]
    logger.info("== 1/3 generate %d hill cases (resolution %g) ==", len(alphas), settings.resolution)
    status = vcnn_main(
        ["generate", "--alphas", *map(str, alphas), "--resolution", str(settings.resolution),
         "--out", str(data), "--no-xdmf"]
    )
    if status != 0:
        raise RuntimeError("case generation failed (see the messages above)")
    logger.info("== 2/3 train (%d epochs at most, CPU-sized) ==", settings.epochs)
    config = out / "train.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "[train]\n"
        f"train_alphas = {list(TRAIN_ALPHAS)}\n"
        f"validation_alphas = {list(VALIDATION_ALPHAS)}\n"
        f"test_alphas = {list(TEST_ALPHAS)}\n"
        f"seed = {seed}\n"
        "batch_size = 256\n"
        "scheduler = \"cosine\"\n"
        "learning_rate = 3e-3\n"
        "patience = 10\n"
    )
    status = vcnn_main(
        ["train", "--config", str(config), "--data", str(data), "--out", str(out / "run"),
         "--epochs", str(settings.epochs), "--queries-per-case", str(settings.queries_per_case),
         "--device", device, "--resume"]
    )
    if status != 0:
        raise RuntimeError("training failed (see the messages above)")
    logger.info("== 3/3 evaluate on the unseen slope factors %s ==", list(TEST_ALPHAS))
    evaluation = out / "evaluation"
    status = vcnn_main(
        ["evaluate", "--model", str(out / "run" / "best.pt"), "--data",
         *(str(data / f"hill_a{alpha:.3f}.npz") for alpha in TEST_ALPHAS),
         "--out", str(evaluation), "--device", device]
    )
    if status != 0:
        raise RuntimeError("evaluation failed (see the messages above)")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    mean_error = sum(m["rel_l2_percent"] for m in metrics) / len(metrics)
    logger.info(
        "\ndemo finished in %.0f s\n  case files and figures: %s\n  training run: %s\n"
        "  evaluation figures: %s",
        time.perf_counter() - start,
        data.resolve(),
        (out / "run").resolve(),
        evaluation.resolve(),
    )
    return mean_error


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of the demo; exit code 0 when the check passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    parser.add_argument("--quick", action="store_true", help="the small version run by tests")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging(0)
    settings = QUICK if args.quick else FULL
    mean_error = run_demo(args.out, settings, device=args.device, seed=args.seed)
    passed = mean_error < settings.tolerance_percent
    logger.info(
        "check: mean relative L2 error of tau on unseen alphas %.2f %% %s %.1f %%: %s",
        mean_error,
        "<" if passed else ">=",
        settings.tolerance_percent,
        "PASSED" if passed else "FAILED",
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
