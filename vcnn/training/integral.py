"""Training of the whole-discretisation integral model (``target = "integral"``).

Each training case is one cloud of all its points (:mod:`vcnn.integral`); all training cases
are one padded batch, and each epoch is one full-batch Adam step on the mean squared
relative error of the integral, ``mean_c ((I_pred,c - I_c) / I_c)^2``. The input normaliser
and the output scaling are fitted on the training cases. The run folder gets what a
pointwise run writes: ``config.toml``, ``lcurve.tsv`` (the relative-L2 columns hold the root
mean square over the cases of the relative integral error, percent), ``best.pt`` (the epoch
with the lowest validation error, of the weights' moving average when ``ema_decay`` is on),
``last.pt`` and ``lcurve.png``. The checkpoints are written when the run ends (a run of this
kind takes seconds to minutes; it neither resumes nor fine-tunes) and record
``checkpoint_kind = "integral"``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vcnn.checkpoint import package_versions, save_checkpoint
from vcnn.config import ConfigError, write_resolved_config
from vcnn.integral import (
    DomainInputs,
    IntegralModel,
    IntegralTarget,
    build_integral_network,
    domain_inputs,
    fit_normalizer,
    integral_feature_spec,
    integral_payload,
    padded_batch,
)
from vcnn.training.config import EpochRecord, TrainConfig, TrainResult
from vcnn.training.schedule import build_scheduler

logger = logging.getLogger(__name__)


def _relative_errors(model: IntegralModel, batch: dict[str, torch.Tensor], truth: torch.Tensor):
    return (model(**batch) - truth) / truth


def train_integral(
    config: TrainConfig,
    *,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train an integral model as ``config`` describes (``config.target == "integral"``).

    Args:
        config: the run's configuration; the cloud, batch and query settings do not apply.
        on_epoch_end: called after each epoch with its record.

    Returns:
        The run's history and checkpoint paths; ``best_validation_rel_l2_percent`` is the
        root mean square relative integral error (percent) over the validation cases.

    Raises:
        ConfigError: on a config this target cannot run (a bad ``[model]`` table, torchrun).
        DatasetError / CaseFileError: on bad or missing case files or splits.
    """
    from vcnn.training.loop import (
        _check_owner,
        _Distributed,
        _lock_run_folder,
        _make_split,
        _write_lcurve,
    )
    from vcnn.training.resume import check_run_folder

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("target = 'integral' trains in one process: run it without torchrun")
    if config.device not in ("auto", "cpu"):
        logger.warning("target = 'integral' trains on the CPU (device %r ignored)", config.device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(config.out)
    replaced = check_run_folder(out_dir, resume=False, overwrite=config.overwrite)
    _check_owner(out_dir, config)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))

    split = _make_split(config)
    try:
        spec = integral_feature_spec(config.features)
    except ValueError as error:
        raise ConfigError(f"bad [features] table {config.features}: {error}") from error
    train_cases = [domain_inputs(source.load(), spec) for source in split.train]
    validation_cases = [domain_inputs(source.load(), spec) for source in split.validation]
    _check_integrals(train_cases + validation_cases)
    table = dict(config.model)
    kind = table.pop("kind", "VectorCloudNet")
    table.pop("preset", None)
    if kind != "VectorCloudNet":
        raise ConfigError(
            f"target = 'integral' trains a VectorCloudNet (volume pooling), got kind {kind!r}"
        )
    try:
        net = build_integral_network(dim=train_cases[0].points.shape[1], spec=spec, overrides=table)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad [model] table {config.model}: {error}") from error
    model = IntegralModel(net, fit_normalizer(train_cases), IntegralTarget.fit(train_cases))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = build_scheduler(optimizer, config)
    averaged = copy.deepcopy(model) if config.ema_decay else model

    train_batch = padded_batch(train_cases)
    train_truth = torch.tensor([c.integral for c in train_cases], dtype=torch.float32)
    validation_batch = padded_batch(validation_cases)
    validation_truth = torch.tensor([c.integral for c in validation_cases], dtype=torch.float32)

    with contextlib.ExitStack() as held:
        _lock_run_folder(held, out_dir, config, _Distributed())
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in replaced if config.overwrite else []:
            path.unlink(missing_ok=True)
        write_resolved_config(out_dir, {"train": config.to_dict(), "split": split.names()})
        logger.info(
            "integral target: training on %d cases (%d points), validating on %d, %d parameters",
            len(train_cases),
            sum(len(c.volume) for c in train_cases),
            len(validation_cases),
            sum(p.numel() for p in model.parameters()),
        )
        history: list[EpochRecord] = []
        best = {"epoch": 0, "rel_l2_percent": math.inf}
        best_state = copy.deepcopy(averaged.state_dict())
        start = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            learning_rate = optimizer.param_groups[0]["lr"]
            model.train()
            errors = _relative_errors(model, train_batch, train_truth)
            loss = torch.mean(errors**2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            train_loss = float(loss.detach())
            optimizer.step()
            scheduler.step()
            if averaged is not model:
                with torch.no_grad():
                    for kept, current in zip(
                        averaged.parameters(), model.parameters(), strict=True
                    ):
                        kept.lerp_(current, 1.0 - config.ema_decay)
            averaged.eval()
            with torch.no_grad():
                validation = _relative_errors(averaged, validation_batch, validation_truth)
            validation_loss = float(torch.mean(validation**2))
            score = 100 * math.sqrt(validation_loss)
            if not (math.isfinite(score) and math.isfinite(train_loss)):
                from vcnn.errors import TrainingDivergedError

                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch}: loss {train_loss}, validation "
                    f"{validation_loss}; lower the learning rate ({config.learning_rate:g})"
                )
            if score < best["rel_l2_percent"] - config.min_delta:
                best = {"epoch": epoch, "rel_l2_percent": score}
                best_state = copy.deepcopy(averaged.state_dict())
            wall_clock = time.perf_counter() - start
            record = EpochRecord(
                epoch=epoch,
                train_loss=train_loss,
                validation_loss=validation_loss,
                train_rel_l2_percent=100 * math.sqrt(train_loss),
                validation_rel_l2_percent=score,
                learning_rate=learning_rate,
                wall_clock_s=wall_clock,
            )
            history.append(record)
            if epoch == 1 or epoch % max(1, config.epochs // 20) == 0:
                logger.info(
                    "epoch %d/%d: train rms rel. integral error %.3f %% | validation %.3f %% | "
                    "lr %.3e | %.1f s",
                    epoch,
                    config.epochs,
                    record.train_rel_l2_percent,
                    score,
                    learning_rate,
                    wall_clock,
                )
            if on_epoch_end is not None:
                on_epoch_end(record)
            if (
                config.time_limit_minutes is not None
                and wall_clock >= 60 * config.time_limit_minutes
            ):
                logger.info("time limit of %g min reached after epoch %d", config.time_limit_minutes, epoch)
                break
        records = {
            "seed": config.seed,
            "train_config": config.to_dict(),
            "split": split.names(),
            "versions": package_versions(),
            "wall_clock_s": history[-1].wall_clock_s if history else 0.0,
        }
        last = integral_payload(
            averaged, spec, extra={**records, "epoch": len(history), "best": dict(best)}
        )
        averaged.load_state_dict(best_state)
        best_payload = integral_payload(
            averaged, spec, extra={**records, "epoch": best["epoch"], "best": dict(best)}
        )
        save_checkpoint(out_dir / "last.pt", last)
        save_checkpoint(out_dir / "best.pt", best_payload)
        _write_lcurve(out_dir / "lcurve.tsv", history)
        if history:
            from vcnn.plotting.training import plot_learning_curves

            try:
                plot_learning_curves(
                    history, out_dir / "lcurve.png", best_epoch=best["epoch"] or None
                )
            except (OSError, ValueError) as error:  # a figure must never lose a trained model
                logger.warning("could not draw the learning curves: %s", error)
    return TrainResult(
        out_dir=out_dir,
        best_checkpoint=out_dir / "best.pt",
        last_checkpoint=out_dir / "last.pt",
        history=history,
        best_epoch=int(best["epoch"]),
        best_validation_rel_l2_percent=float(best["rel_l2_percent"]),
        stopped_early=False,
        seed=config.seed,
        clouds_per_second=math.nan,
        split=split.names(),
        model=averaged,
        engine="integral",
    )


def _check_integrals(cases: list[DomainInputs]) -> None:
    """Refuse a case whose integral of tau is zero or not finite (no relative error)."""
    bad = [c.name for c in cases if not (math.isfinite(c.integral) and c.integral != 0)]
    if bad:
        from vcnn.datasets import DatasetError

        raise DatasetError(
            f"target = 'integral' needs a finite, non-zero integral of tau in every case; "
            f"{bad[:5]} have none"
        )


__all__ = ["train_integral"]
