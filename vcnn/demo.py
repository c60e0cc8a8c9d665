"""The quick end-to-end pipeline behind ``make demo``.

1. ``generate``: small periodic-hill cases with the FEniCSx solver (alpha in TRAIN, VALIDATION,
   TEST), two-way coupled (nu_t = C_k l_m sqrt(tau), C_k = 0.14) so that the closure can
   later replace the tau equation inside the flow solver;
2. ``train``: a vector-cloud network on the training cases, early-stopped on validation;
3. ``evaluate``: the a-priori error on the unseen test slope factors, with full clouds;
4. ``simulate``: the network in the loop, two-way, on an unseen slope factor, against the
   fully coupled PDE solution (a posteriori);

then prints the error tables and the folders it wrote with what each holds (only files that
exist), and checks the a-priori and the a-posteriori errors against tolerances (exit code 1
when one is not met). ``--quick`` is a smaller version that the test suite runs.

Usage: python -m vcnn.demo [--out results/demo] [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vcnn.cli import configure_logging
from vcnn.cli import main as vcnn_main

logger = logging.getLogger("vcnn.demo")

TRAIN_ALPHAS = (0.8, 1.0, 1.3, 1.6)
VALIDATION_ALPHAS = (1.15,)
TEST_ALPHAS = (1.45, 1.9)
SIMULATE_ALPHA = 1.45
#: Eddy-viscosity coefficient of the demo's coupled data: peak nu_t about twice nu.
C_K = 0.14


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo: the full one (``make demo``) or the quick one (tests)."""

    resolution: float
    epochs: int
    queries_per_case: int
    #: the check: mean relative L2 error (%) of tau on the test cases must be below this
    tolerance_percent: float
    #: the check: relative L2 error (%) of tau of the network-in-the-loop run against the
    #: coupled PDE solution must be below this
    simulate_tolerance_percent: float


FULL = DemoSettings(
    resolution=0.2,
    epochs=40,
    queries_per_case=1200,
    tolerance_percent=10.0,
    simulate_tolerance_percent=10.0,
)
QUICK = DemoSettings(
    resolution=0.1,
    epochs=4,
    queries_per_case=200,
    tolerance_percent=40.0,
    simulate_tolerance_percent=50.0,
)


@dataclass(frozen=True)
class DemoResult:
    """The errors the demo checks.

    Attributes:
        a_priori_percent: mean relative L2 error of tau on the test cases (network on the
            truth's flow).
        a_posteriori_percent: relative L2 error of tau of the network-in-the-loop run.
        converged: whether the network-in-the-loop run reached its fixed point.
    """

    a_priori_percent: float
    a_posteriori_percent: float
    converged: bool


def run_demo(
    out: Path, settings: DemoSettings, *, device: str = "auto", seed: int = 0
) -> DemoResult:
    """Run the pipeline into ``out``; returns the errors it checks."""
    import json

    start = time.perf_counter()
    data = out / "cases"
    alphas = [*TRAIN_ALPHAS, *VALIDATION_ALPHAS, *TEST_ALPHAS]
    logger.info(
        "== 1/4 generate %d coupled hill cases (resolution %g, C_k %g) ==",
        len(alphas),
        settings.resolution,
        C_K,
    )
    status = vcnn_main(
        ["generate", "--alphas", *map(str, alphas), "--resolution", str(settings.resolution),
         "--c-k", str(C_K), "--out", str(data), "--no-xdmf"]
    )
    if status != 0:
        raise RuntimeError("case generation failed (see the messages above)")
    logger.info("== 2/4 train (%d epochs at most, CPU-sized) ==", settings.epochs)
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
        "min_learning_rate = 0.0\n"
        "ema_decay = 0\n"  # a run of a few hundred steps: no moving average of the weights
        "patience = 10\n"
    )
    status = vcnn_main(
        ["train", "--config", str(config), "--data", str(data), "--out", str(out / "run"),
         "--epochs", str(settings.epochs), "--queries-per-case", str(settings.queries_per_case),
         "--device", device, "--resume"]
    )
    if status != 0:
        raise RuntimeError("training failed (see the messages above)")
    logger.info("== 3/4 evaluate on the unseen slope factors %s ==", list(TEST_ALPHAS))
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
        "== 4/4 simulate: the network replaces the tau equation, two-way, alpha = %g ==",
        SIMULATE_ALPHA,
    )
    simulation = out / "simulate"
    status = vcnn_main(
        ["simulate", "--alphas", str(SIMULATE_ALPHA), "--resolution", str(settings.resolution),
         "--model", str(out / "run" / "best.pt"), "--coupling", "two-way", "--compare",
         "--out", str(simulation), "--device", device]
    )
    if status != 0:
        raise RuntimeError("the coupled simulation failed (see the messages above)")
    (entry,) = json.loads((simulation / "metrics.json").read_text())
    folders = {
        "cases": data,
        "training run": out / "run",
        "evaluation": evaluation,
        "coupled simulation": simulation,
    }
    logger.info(
        "\ndemo finished in %.0f s\n%s",
        time.perf_counter() - start,
        "\n".join(
            f"  {label}: {folder.resolve()} ({written_files(folder)})"
            for label, folder in folders.items()
            if folder.is_dir()
        ),
    )
    return DemoResult(
        a_priori_percent=mean_error,
        a_posteriori_percent=float(entry["tau_rel_l2_percent"]),
        converged=bool(entry["converged"]),
    )


def written_files(folder: Path) -> str:
    """What ``folder`` holds, counted from its files: e.g. ``7 .npz, 7 .png, config.toml``.

    Kinds with several files are counted by suffix, single files named, so the demo announces
    only what it wrote (an XDMF file is listed only where one exists).
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    suffixes = Counter(path.suffix for path in files)
    named = [path.name for path in files if suffixes[path.suffix] == 1]
    counted = [f"{count} {suffix}" for suffix, count in sorted(suffixes.items()) if count > 1]
    return ", ".join(counted + named) or "empty"


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
    result = run_demo(args.out, settings, device=args.device, seed=args.seed)
    a_priori = result.a_priori_percent < settings.tolerance_percent
    a_posteriori = (
        result.converged and result.a_posteriori_percent < settings.simulate_tolerance_percent
    )
    logger.info(
        "check: mean relative L2 error of tau on unseen alphas (a priori) %.2f %% %s %.1f %%: "
        "%s",
        result.a_priori_percent,
        "<" if a_priori else ">=",
        settings.tolerance_percent,
        "PASSED" if a_priori else "FAILED",
    )
    logger.info(
        "check: network in the loop against the coupled PDE solution (a posteriori, alpha = "
        "%g) %.2f %% %s %.1f %%%s: %s",
        SIMULATE_ALPHA,
        result.a_posteriori_percent,
        "<" if a_posteriori else ">=",
        settings.simulate_tolerance_percent,
        "" if result.converged else " (not converged)",
        "PASSED" if a_posteriori else "FAILED",
    )
    return 0 if a_priori and a_posteriori else 1


if __name__ == "__main__":
    raise SystemExit(main())
