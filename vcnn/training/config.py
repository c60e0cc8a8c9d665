"""The configuration and the records of a training run (:class:`TrainConfig`, :class:`TrainResult`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from vcnn.closure import DEVICE_REQUEST
from vcnn.clouds import CloudOptions
from vcnn.config import (
    TRAIN_RENAMED_KEYS,
    ConfigError,
    check_keys,
    check_types,
    merge,
    renamed_keys,
)
from vcnn.features import FeatureSpec

logger = logging.getLogger(__name__)

SCHEDULERS = ("step", "cosine", "onecycle", "constant")
#: ``queries_per_case`` / ``validation_queries_per_case`` value for "every point".
ALL_QUERIES = "all"
#: Share of the cases held out for validation when no split is given (at least one case).
HOLD_OUT_FRACTION = 0.2
BATCH_GROUPINGS = ("random", "case")
#: What a run learns: tau at each point from its cloud (the closure), or the integral of tau
#: over the domain from the whole discretisation as one cloud (:mod:`vcnn.integral`).
TARGETS = ("tau", "integral")
LCURVE_COLUMNS = (
    "epoch",
    "train_loss",
    "validation_loss",
    "train_rel_l2_percent",
    "validation_rel_l2_percent",
    "learning_rate",
    "wall_clock_s",
)


@dataclass
class TrainConfig:
    """Everything a training run depends on; TOML-friendly (see :meth:`from_dict`).

    The defaults are the documented CPU recipe, ``experiments/published/train_cpu.toml``
    (the run behind the shipped published model): its every setting except the data, the
    split and the two settings of the machine it ran on (``time_limit_minutes = 58``,
    ``num_threads = 1``), so that ``vcnn train --data D --out O`` trains as that recipe does.

    Attributes:
        data: folder of the case files (``*.npz``; formerly ``data_dir``).
        out: run folder (checkpoints, lcurve.tsv, config.toml, figures; formerly ``out_dir``).
        train_cases: names/paths of the training cases; default: every case of ``data``
            that is in no other split (or the cases of ``train_alphas``).
        validation_cases: names/paths of the validation cases (early stopping, best.pt).
            Without ``validation_cases``/``validation_alphas`` (and without a training
            split), :data:`HOLD_OUT_FRACTION` of the cases (rounded, at least one) are held
            out, chosen by ``seed``; a run without a validation case is refused.
        test_cases: names/paths of held-out cases (recorded, not used in training).
        train_alphas: select the training cases by ``meta["alpha"]`` instead of by name.
        validation_alphas: select the validation cases by alpha.
        test_alphas: select the test cases by alpha.
        seed: seed of everything random (weights, cloud draws, shuffling); recorded.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: bf16 autocast on CUDA (ignored with a warning on the CPU).
        epochs: maximum number of epochs.
        batch_size: clouds per optimiser step (per rank under torchrun).
        cloud_size: points drawn per cloud each epoch (150 in the paper).
        queries_per_case: query points drawn per case per epoch; ``"all"``: every point.
        validation_queries_per_case: query points per validation case (drawn once);
            ``"all"``: every point.
        learning_rate: Adam's (peak) learning rate.
        weight_decay: Adam's L2 weight decay.
        scheduler: ``"cosine"`` (to ``min_learning_rate`` at ``epochs``; a resume with more
            epochs continues from the current rate down to ``min_learning_rate`` at the new
            ``epochs``, never rising), ``"step"`` (StepLR, as in the paper), ``"onecycle"``
            (per epoch; its length cannot change on resume) or ``"constant"``.
        step_size: StepLR period in epochs.
        gamma: StepLR factor.
        min_learning_rate: floor of the cosine schedule (at most ``learning_rate``).
        patience: stop after this many epochs without a validation improvement larger than
            ``min_delta`` (relative L2 percent); None: never stop early.
        min_delta: improvement threshold of early stopping, in percentage points.
        volume_weighted_metrics: weight the relative L2 errors by the nodal volumes.
        batch_grouping: ``"case"`` (each batch comes from one case: fewer distinct points
            per batch, so a factorised net embeds each point once per batch at a fraction of
            the cost) or ``"random"`` (every batch mixes all cases).
        ema_decay: when in (0, 1), validate, select and save an exponential moving average
            of the weights, ``w_avg <- decay w_avg + (1 - decay) w`` after every optimiser
            step (the raw weights are kept in ``last.pt`` to resume): the average is smoother
            than the last iterate and usually generalises better. It spans about
            ``1 / (1 - decay)`` steps (500 for 0.998), so a run of fewer steps than that
            selects weights close to the initial ones: set 0 (no average) for short runs.
        resume: continue from ``out/last.pt`` when it exists; the run's settings must
            match the checkpoint's (only ``epochs`` may grow), see :mod:`vcnn.training.resume`.
        init_model: start a new run from this checkpoint's weights (fine-tuning; a
            ``best.pt``, ``last.pt`` or exported model). The network (``model`` table) and
            the inputs (``features`` table) must be the checkpoint's; the input normaliser
            and the target scale are the checkpoint's too (not refitted), so the network
            sees its inputs as it did before; the optimiser, the schedule and the epochs start
            afresh. Recorded in ``config.toml`` and as ``init_model`` in the checkpoints.
            Excludes ``resume`` (a resumed run continues from its ``last.pt``).
        overwrite: replace the run that ``out`` holds (without it, and without
            ``resume``, a folder that holds a run is refused).
        progress: a per-batch progress bar (tqdm) on stderr; None: only when stderr is a
            terminal.
        num_threads: torch CPU threads; None: torch's default.
        time_limit_minutes: stop after the epoch during which the run's wall clock (summed
            over resumed sessions) passes this many minutes; None: no limit. The checkpoints
            of that epoch are written, so ``resume`` with a larger limit continues the run.
        model: network table: ``kind`` (``"VectorCloudNet"`` or ``"BaselineNet"``),
            ``preset`` (``"default"`` or ``"published"``, VectorCloudNet only) and any
            constructor argument as an override (e.g. ``embedding = [16, 32]``).
        cloud: cloud table (see :class:`vcnn.clouds.CloudOptions`); the ellipse's operator
            coefficients default to the training data's physics.
        features: input table (see :class:`vcnn.features.FeatureSpec`; default: its
            defaults).
        target: ``"tau"`` (the pointwise closure) or ``"integral"`` (the integral of tau
            of each case from all its points as one cloud, :mod:`vcnn.training.integral`;
            full-batch over the training cases, so the cloud, batch and query settings do
            not apply; it does not resume or fine-tune).
    """

    data: str
    out: str
    train_cases: list[str] | None = None
    validation_cases: list[str] | None = None
    test_cases: list[str] | None = None
    train_alphas: list[float] | None = None
    validation_alphas: list[float] | None = None
    test_alphas: list[float] | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    epochs: int = 100
    batch_size: int = 256
    cloud_size: int = 150
    queries_per_case: int | str | None = 2000
    validation_queries_per_case: int | str | None = 2500
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    step_size: int = 600
    gamma: float = 0.7
    min_learning_rate: float = 2e-5
    patience: int | None = None
    min_delta: float = 0.0
    volume_weighted_metrics: bool = False
    batch_grouping: str = "case"
    ema_decay: float | None = 0.998
    resume: bool = False
    init_model: str | None = None
    overwrite: bool = False
    progress: bool | None = None
    num_threads: int | None = None
    time_limit_minutes: float | None = None
    model: dict[str, Any] = field(default_factory=dict)
    cloud: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    target: str = "tau"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges.

        Raises:
            ConfigError: naming the bad field and what it must be.
        """
        if not (isinstance(self.device, str) and DEVICE_REQUEST.fullmatch(self.device)):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "integral" and (self.resume or self.init_model is not None):
            raise ConfigError(
                "target = 'integral' trains in one session from fresh weights: drop resume "
                "(--resume) and init_model (--init-model)"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        # The "off" values that TOML can write (it has no null), so config.toml reads back.
        if self.ema_decay is None:
            self.ema_decay = 0.0
        if isinstance(self.ema_decay, bool) or not 0 <= self.ema_decay < 1:
            raise ConfigError(
                f"ema_decay must lie in [0, 1) (0: no moving average), got {self.ema_decay}"
            )
        self.ema_decay = float(self.ema_decay)
        for name in ("queries_per_case", "validation_queries_per_case"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, value := ALL_QUERIES)
            if value != ALL_QUERIES and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(
                    f"{name} must be an integer >= 1 or {ALL_QUERIES!r} (every point), "
                    f"got {value!r}"
                )
        if self.init_model is not None and self.resume:
            raise ConfigError(
                "init_model (--init-model) and resume (--resume) exclude each other: --resume "
                "continues the run in --out from its last.pt; --init-model starts a new run "
                "from another model's weights"
            )
        if self.init_model is not None and not str(self.init_model).strip():
            raise ConfigError("init_model must be a checkpoint path, got an empty string")
        if self.batch_grouping not in BATCH_GROUPINGS:
            raise ConfigError(
                f"batch_grouping must be one of {BATCH_GROUPINGS}, got {self.batch_grouping!r}"
            )
        for name in ("epochs", "batch_size", "cloud_size", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("patience", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or absent, got {value!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise ConfigError(f"time_limit_minutes must be > 0, got {self.time_limit_minutes}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.weight_decay < 0 or self.min_learning_rate < 0 or self.min_delta < 0:
            raise ConfigError("weight_decay, min_learning_rate and min_delta must be >= 0")
        if self.scheduler == "cosine" and self.min_learning_rate > self.learning_rate:
            raise ConfigError(
                f"min_learning_rate ({self.min_learning_rate:g}) must not exceed learning_rate "
                f"({self.learning_rate:g}) for the cosine schedule, which falls from one to "
                "the other"
            )
        if not all(isinstance(t, dict) for t in (self.model, self.cloud, self.features)):
            raise ConfigError("model, cloud and features must be tables")
        try:
            CloudOptions.from_dict(self.cloud)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"bad [cloud] table {self.cloud}: {error}") from error
        if self.target == "integral":
            from vcnn.integral import integral_feature_spec

            try:
                integral_feature_spec(self.features)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"bad [features] table {self.features}: {error}") from error
        else:
            self.feature_spec()

    def feature_spec(self) -> FeatureSpec:
        """The input specification of the ``features`` table.

        Raises:
            ConfigError: on unknown keys or bad values.
        """
        try:
            return FeatureSpec.from_dict(self.features)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"bad [features] table {self.features}: {error}") from error

    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """Build from a (TOML) ``[train]`` table, with flag ``overrides`` (None = not given).

        The former keys ``data_dir`` and ``out_dir`` of the table are read as ``data`` and
        ``out`` (:data:`vcnn.config.TRAIN_RENAMED_KEYS`), with a one-line deprecation notice.

        Raises:
            ConfigError: on unknown keys, missing ``data``/``out``, a key given under both its
                old and its current name, or bad values.
        """
        config = merge(renamed_keys(config, TRAIN_RENAMED_KEYS, "[train]"), overrides or {})
        allowed = {f.name for f in fields(cls)}
        check_keys(config, allowed, "the train config")
        check_types(config, cls, "the train config:")
        missing = [key for key in ("data", "out") if key not in config]
        if missing:
            raise ConfigError(
                f"the train config needs {missing}: give "
                f"{' and '.join(f'--{key}' for key in missing)} (or set them in [train])"
            )
        values = dict(config)
        for key in ("data", "out"):
            values[key] = str(values[key])
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(f"bad train config: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """TOML-friendly dictionary (None values left out; TOML has no null)."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    def queries(self, *, validation: bool = False) -> int | None:
        """Query points per case per draw (None: every point) for training or validation."""
        value = self.validation_queries_per_case if validation else self.queries_per_case
        return None if value == ALL_QUERIES else int(value)


@dataclass
class EpochRecord:
    """Metrics of one epoch (one row of ``lcurve.tsv``).

    Attributes:
        epoch: 1-based epoch number.
        train_loss: mean squared error of the scaled target over the epoch's batches.
        validation_loss: same on the validation clouds.
        train_rel_l2_percent: relative L2 error of tau on the training clouds, percent.
        validation_rel_l2_percent: same on the validation cases.
        learning_rate: learning rate used in this epoch.
        wall_clock_s: seconds since the start of the run (summed over resumed sessions).
    """

    epoch: int
    train_loss: float
    validation_loss: float
    train_rel_l2_percent: float
    validation_rel_l2_percent: float
    learning_rate: float
    wall_clock_s: float


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        out_dir: the run folder.
        best_checkpoint: path of ``best.pt``.
        last_checkpoint: path of ``last.pt``.
        history: one record per epoch (including epochs of earlier sessions when resumed).
        best_epoch: epoch of ``best.pt``: the lowest validation relative L2 error (0 when no
            epoch ran in this or an earlier session).
        best_validation_rel_l2_percent: that error, percent (inf when no epoch ran).
        stopped_early: whether early stopping ended the run.
        seed: the run's seed.
        clouds_per_second: training throughput of this session (clouds per second per run,
            all ranks together), training passes only.
        split: case names per split.
        model: the trained network of the last epoch (unwrapped from DDP), on its device.
        engine: the backend of the training pass (:mod:`vcnn.engines`): ``"fused"`` (the C
            kernels), ``"sparse"`` or ``"padded"``; the same on every rank.
    """

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[EpochRecord]
    best_epoch: int
    best_validation_rel_l2_percent: float
    stopped_early: bool
    seed: int
    clouds_per_second: float
    split: dict[str, list[str]]
    model: nn.Module
    engine: str = ""
