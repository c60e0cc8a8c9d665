"""Learning-rate schedules of a training run, stepped once per epoch so resuming is exact."""

from __future__ import annotations

import math
from typing import Any

import torch

from vcnn.training.config import TrainConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule named by ``config.scheduler`` (step, cosine, onecycle or constant).

    Args:
        optimizer: the optimiser whose learning rate is scheduled.
        config: the run's configuration (``scheduler``, ``epochs`` and the schedule's numbers).

    Returns:
        A scheduler stepped once per epoch, so resuming at an epoch boundary is exact.
    """
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.step_size, gamma=config.gamma
        )
    if config.scheduler == "cosine":
        return CosineToFloor(optimizer, epochs=config.epochs, min_lr=config.min_learning_rate)
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, total_steps=config.epochs + 1
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=_constant_factor)


def _constant_factor(epoch: int) -> float:
    return 1.0


class CosineToFloor(torch.optim.lr_scheduler.LRScheduler):
    """Cosine annealing to ``min_lr`` at epoch ``epochs`` whose horizon can be moved smoothly.

    The rate after ``t`` steps (one per epoch) is ``min_lr + (lr0 - min_lr) (1 + cos(pi (t -
    t0) / (T - t0))) / 2`` on the current segment, which starts at step ``t0 = 0`` from the
    base rate and ends at ``T = epochs`` (where it equals ``CosineAnnealingLR``). :meth:`extend`
    starts a new segment at the current step from the current rate, so a resumed run with
    another number of epochs continues without a jump and never rises. The segment is part of
    :meth:`state_dict`, so resuming an extended run is exact.

    Args:
        optimizer: the optimiser whose rate is scheduled.
        epochs: the last epoch (the segment's end ``T``).
        min_lr: the floor, reached at ``T``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, epochs: int, min_lr: float) -> None:
        self.horizon = int(epochs)
        self.min_lr = float(min_lr)
        self.segment_start = 0
        self.start_lrs: list[float] | None = None  # None: the optimiser's base rates
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """The rates of the current step (closed form)."""
        start_lrs = self.start_lrs if self.start_lrs is not None else self.base_lrs
        span = max(self.horizon - self.segment_start, 1)
        progress = min(max(self.last_epoch - self.segment_start, 0), span) / span
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return [self.min_lr + (start - self.min_lr) * factor for start in start_lrs]

    def extend(self, epochs: int) -> bool:
        """Move the end of the schedule to ``epochs``, continuing from the current rate.

        Returns:
            Whether the horizon changed.
        """
        if int(epochs) == self.horizon:
            return False
        self.start_lrs = [float(lr) for lr in self.get_last_lr()]
        self.segment_start = self.last_epoch
        self.horizon = int(epochs)
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state, also from a ``CosineAnnealingLR`` of an older checkpoint."""
        state = dict(state_dict)
        if "horizon" not in state and "T_max" in state:
            state["horizon"] = int(state.pop("T_max"))
            state.pop("eta_min", None)
        super().load_state_dict(state)
