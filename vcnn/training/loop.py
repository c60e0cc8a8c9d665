"""Training of a vector-cloud network on case files (single process or torchrun data parallel).

:func:`train` reads the cases of a :class:`TrainConfig`, splits them by case, fits the
normalisers on the training cases, and trains with Adam and a learning-rate schedule, redrawing
the clouds of every query point each epoch. Outputs in ``out`` (the run folder):

* ``config.toml``: the resolved configuration (with the seed);
* ``lcurve.tsv``: one row per epoch (losses, relative L2 errors in percent, learning rate,
  wall-clock seconds since the start of the run);
* ``last.pt``: the checkpoint of the last completed epoch, written atomically after every
  epoch (see :mod:`vcnn.checkpoint`); ``resume = true`` continues from it and gives the same
  result as an uninterrupted run of the same seed and settings;
* ``best.pt``: the checkpoint of the epoch with the lowest validation relative L2 error so
  far (an epoch counts as better when it improves on the best by more than ``min_delta``
  percentage points): its weights, the moving average of the weights when ``ema_decay`` is on,
  with the normalisers and the run's records; written atomically (a temporary file renamed
  over the old one) whenever the validation error improves, so it is always a complete
  checkpoint of one epoch;
* ``lcurve.png``: the loss curves, drawn at the end.

The split is by whole cases. Without a validation split (and without a training split), a
fraction :data:`HOLD_OUT_FRACTION` of the cases (at least one) is held out for validation,
chosen by the seed, and one log line names them; a run whose validation split would be empty
is refused, so the validation error is never undefined.

Resuming with a larger ``epochs`` extends the schedule without a jump: the step schedule
continues as it is, and the cosine schedule continues from the learning rate it has reached,
falling to ``min_learning_rate`` at the new last epoch (the learning rate never rises again;
a finished cosine run that is extended stays at ``min_learning_rate``). ``init_model``
starts a new run from a checkpoint's weights (fine-tuning): see :class:`TrainConfig`.

Relative L2 error (percent) = 100 ||pred - tau||_2 / ||tau||_2 over the query points of the
cases, unweighted by default (every closure point counts once, as in the paper); with
``volume_weighted_metrics = true`` each point is weighted by its nodal volume, which
approximates the L2 norm of the fields over the domain and does not favour refined regions.
The training error is accumulated from the predictions of the training pass itself (before
each optimiser step), so it costs nothing extra; the validation error uses clouds drawn once
with a fixed seed, so it is comparable between epochs.

Data parallel: launched by ``torchrun --nproc-per-node P``, each rank takes every P-th cloud
of the epoch's shuffled order (padded so that every rank runs the same number of batches),
DistributedDataParallel averages the gradients (gloo on the CPU, nccl on CUDA), metrics are
summed over the ranks, and only rank 0 writes files and logs. DistributedDataParallel wraps the
training pass (:class:`vcnn.engines.TrainingPass`), so every rank runs the backend a single
process would (the C kernels on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vcnn.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model,
    package_versions,
    restore_rng_state,
    save_checkpoint,
)
from vcnn.closure import resolve_device
from vcnn.clouds import CloudOptions
from vcnn.config import (
    ConfigError,
    atomic_write_text,
    write_resolved_config,
)
from vcnn.datasets import (
    CaseSource,
    CaseSplit,
    CloudDataset,
    CloudPlan,
    DatasetError,
    TargetScaler,
    derive_seed,
    discover_cases,
    hold_out_cases,
    make_split,
)
from vcnn.engines import TrainingPass
from vcnn.engines.device import DeviceDraws
from vcnn.errors import TrainingDivergedError, UsageError, one_line
from vcnn.features import FeatureNormalizer, FeatureSpec
from vcnn.outputs import check_output_owner, output_lock
from vcnn.physics import Physics
from vcnn.training.config import (
    HOLD_OUT_FRACTION,
    LCURVE_COLUMNS,
    SCHEDULERS,
    EpochRecord,
    TrainConfig,
    TrainResult,
)
from vcnn.training.resume import check_initialisable, check_resumable, check_run_folder
from vcnn.training.schedule import CosineToFloor, build_scheduler

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ helpers
@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_request: str) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialised_here = False
    if not dist.is_initialized():
        use_cuda = device_request != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialised_here = True
    return _Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        initialised_here=initialised_here,
    )


class _Progress:
    """A per-batch progress bar of each epoch on stderr (tqdm), removed when the epoch ends.

    The epoch's summary line is logged after it, so a finished run shows only those lines.
    """

    #: Seconds between two reads of the batch loss: each read waits for the device.
    LOSS_READ_SECONDS = 0.5

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._epoch = 0
        self._loss_read = -math.inf

    def update(
        self, epoch: int, epochs: int, batch: int, batches: int, loss: torch.Tensor
    ) -> None:
        """Advance the bar of ``epoch`` to ``batch`` of ``batches``, showing the batch loss.

        The loss (a 0-d tensor, on the device) is read at most every
        :attr:`LOSS_READ_SECONDS`, so the bar does not make each batch wait for the device.
        """
        if not self.enabled:
            return
        if self._bar is None or self._epoch != epoch:
            from tqdm import tqdm

            self.close()
            self._bar = tqdm(
                total=batches,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            self._epoch = epoch
            self._loss_read = -math.inf  # every bar shows a loss from its first batch
        self._bar.update(batch - self._bar.n)
        now = time.monotonic()
        if now - self._loss_read >= self.LOSS_READ_SECONDS:
            self._loss_read = now
            self._bar.set_postfix_str(f"loss {float(loss):.3e}", refresh=False)

    def close(self) -> None:
        """Remove the bar (the epoch ended)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _build_network(
    config: TrainConfig, *, dim: int, spec: FeatureSpec
) -> nn.Module:
    table = dict(config.model)
    kind = table.pop("kind", "VectorCloudNet")
    preset = table.pop("preset", "default")
    from vcnn.network import BaselineNet, VectorCloudNet

    num_scalars, num_vectors = spec.num_scalars, spec.num_vectors
    try:
        if kind == "VectorCloudNet":
            return VectorCloudNet.from_preset(
                preset,
                dim=dim,
                num_scalars=num_scalars,
                num_vectors=num_vectors,
                point_scalar_columns=spec.point_scalar_columns,
                **table,
            )
        if kind == "BaselineNet":
            return BaselineNet(
                dim=dim, num_scalars=num_scalars, num_vectors=num_vectors, **table
            )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad [model] table {config.model}: {error}") from error
    raise ConfigError(f"model kind must be 'VectorCloudNet' or 'BaselineNet', got {kind!r}")


def _make_split(config: TrainConfig, *, log: bool = True) -> CaseSplit:
    """The split of the config; without a validation split, cases held out for it.

    Args:
        config: the run's configuration.
        log: log the held-out cases (the main rank).

    Raises:
        DatasetError: when the split is inconsistent or no validation case can be had.
    """
    sources = discover_cases(config.data)
    split = make_split(
        sources,
        train=config.train_cases,
        validation=config.validation_cases,
        test=config.test_cases,
        train_alphas=config.train_alphas,
        validation_alphas=config.validation_alphas,
        test_alphas=config.test_alphas,
        data_dir=config.data,
    )
    if split.validation:
        return split
    fix = (
        "name the validation cases with validation_alphas = [...] or validation_cases = "
        "[names or paths] in the [train] table of --config"
    )
    if config.validation_cases is not None or config.validation_alphas is not None:
        raise DatasetError(f"the validation split is empty: {fix}")
    if config.train_cases is not None or config.train_alphas is not None:
        raise DatasetError(
            f"no validation case: the training split is given but no validation split; {fix} "
            f"(or give neither, and {HOLD_OUT_FRACTION:.0%} of the cases are held out)"
        )
    if len(split.train) < 2:
        names = ", ".join(source.name for source in split.train)
        raise DatasetError(
            f"--data {str(config.data)!r} holds {len(split.train)} case(s) for training "
            f"({names}) and no validation case (best.pt and early stopping are chosen on one): "
            "add cases to hold one out, or name a validation case elsewhere with "
            "validation_cases = [path] in the [train] table of --config"
        )
    kept, held = hold_out_cases(split.train, fraction=HOLD_OUT_FRACTION, seed=config.seed)
    (logger.warning if log else logger.debug)(
        "no validation split given: holding out %d of %d cases (%.0f %%, chosen by seed %d) "
        "for validation: %s; choose them with validation_alphas or validation_cases in [train]",
        len(held),
        len(split.train),
        100 * HOLD_OUT_FRACTION,
        config.seed,
        ", ".join(source.name for source in held),
    )
    return CaseSplit(train=kept, validation=held, test=split.test)


@dataclass
class _InitialModel:
    """What a fine-tuning run takes from its ``init_model`` checkpoint."""

    metadata: dict[str, Any]
    state: dict[str, torch.Tensor]
    normalizer: FeatureNormalizer
    target_scale: float
    record: dict[str, Any]


def _load_initial_model(path: str) -> _InitialModel:
    """The weights, normaliser and target scale of ``init_model`` (every number checked).

    Raises:
        CheckpointError: naming the file when it is unusable or has no input normaliser.
    """
    where = f"--init-model {str(path)!r}"
    try:
        loaded = load_model(path, device="cpu")
    except CheckpointError as error:
        raise CheckpointError(f"{where}: {error}") from error
    if loaded.feature_normalizer_state is None or "feature_spec" not in loaded.metadata:
        raise CheckpointError(
            f"{where} records no input normaliser or feature spec: give a checkpoint that "
            "vcnn train wrote (best.pt, last.pt or its export)"
        )
    normalizer = FeatureNormalizer()
    try:
        normalizer.load_state_dict(loaded.feature_normalizer_state)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from error
    metadata = loaded.metadata
    record = {
        "path": str(Path(path).resolve()),
        "epoch": metadata.get("epoch"),
        "seed": metadata.get("seed"),
    }
    return _InitialModel(
        metadata=metadata,
        state=loaded.model.state_dict(),
        normalizer=normalizer,
        target_scale=loaded.target_scale,
        record=record,
    )


def _log_initial_model(path: str, metadata: dict[str, Any], physics: Physics | None) -> None:
    """One line on where the weights come from, and one when the physics changes."""
    logger.info(
        "starting from the weights of %s (epoch %s), with its input normaliser and target "
        "scale; optimiser and schedule start afresh",
        path,
        metadata.get("epoch", "?"),
    )
    recorded = metadata.get("physics")
    if physics is not None and recorded is not None:
        try:
            differences = Physics.from_dict(recorded).differences(physics)
        except (TypeError, ValueError):
            differences = ["unreadable physics record"]
        if differences:
            logger.warning(
                "the init model was trained on data of other physics (%s): fine-tuning to "
                "the physics of --data",
                "; ".join(differences),
            )


def _warn_short_average(config: TrainConfig, *, steps: int) -> None:
    """Warn when the moving average spans more optimiser steps than a new run takes."""
    span = 1.0 / (1.0 - float(config.ema_decay))
    if steps < span:
        logger.warning(
            "ema_decay %g averages over about %.0f optimiser steps but this run takes about %d: "
            "best.pt will stay close to the initial weights; set ema_decay = 0 for short runs",
            config.ema_decay,
            span,
            steps,
        )


def _check_validation_target(split: CaseSplit) -> None:
    """Refuse validation cases whose tau is zero everywhere (their relative error is undefined).

    Raises:
        DatasetError: naming the cases.
    """
    cases = [source.load() for source in split.validation]
    if sum(float(np.dot(case.tau, case.tau)) for case in cases) > 0:
        return
    names = ", ".join(source.name for source in split.validation)
    raise DatasetError(
        f"the validation cases ({names}) have tau = 0 at every point, so their relative error "
        "is undefined: choose other validation cases (validation_alphas or validation_cases)"
    )


@dataclass
class _Sums:
    """Sums of squared errors and squared targets (and a loss sum), reducible over ranks.

    :meth:`add` accumulates on the predictions' device (float64, the same additions as on the
    host) and :meth:`reduced` reads the sums once: no host synchronisation per batch.
    """

    squared_error: float = 0.0
    squared_target: float = 0.0
    loss: float = 0.0
    count: float = 0.0
    #: (3,) float64 on the device: squared error, squared target, loss not yet read.
    pending: torch.Tensor | None = field(default=None, repr=False)

    def add(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        volume: torch.Tensor,
        *,
        weighted: bool,
        count: int,
    ) -> None:
        error = (prediction.detach().float() - target).square()
        truth = target.square()
        loss = error.sum()
        self.count += count
        if weighted:
            error, truth = error * volume, truth * volume
        values = torch.stack([error.sum(), truth.sum(), loss]).to(torch.float64)
        self.pending = values if self.pending is None else self.pending + values

    def _settle(self) -> None:
        """Read the device sums into the host fields (one synchronisation)."""
        if self.pending is not None:
            squared_error, squared_target, loss = self.pending.tolist()
            self.squared_error += squared_error
            self.squared_target += squared_target
            self.loss += loss
            self.pending = None

    def reduced(self, distributed: _Distributed, device: torch.device) -> _Sums:
        self._settle()
        if distributed.world_size == 1:
            return self
        values = torch.tensor(
            [self.squared_error, self.squared_target, self.loss, self.count],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(values)
        return _Sums(*[float(v) for v in values.tolist()])

    @property
    def rel_l2_percent(self) -> float:
        if self.squared_target <= 0:
            return math.nan
        return 100.0 * math.sqrt(self.squared_error / self.squared_target)

    @property
    def mean_loss(self) -> float:
        return self.loss / self.count if self.count > 0 else math.nan


def _epoch_batches(
    plan: CloudPlan,
    dataset: CloudDataset,
    config: TrainConfig,
    generator: torch.Generator,
    distributed: _Distributed,
) -> list[torch.Tensor]:
    """This rank's batches of the epoch: rows of the plan, in training order.

    ``batch_grouping = "random"`` shuffles all clouds together; ``"case"`` shuffles the
    clouds within each case, cuts each case into batches and shuffles the batches: a batch
    then touches one mesh, so a factorised net embeds far fewer distinct points per step.
    """
    count = plan.queries.numel()
    # Each batch lists its clouds in plan order (query order within a case): the set is what
    # the loss sees, and clouds of nearby queries share points, which the kernels then find in
    # cache (5-8 % faster steps).
    if config.batch_grouping == "random":
        mine = _shard(torch.randperm(count, generator=generator), distributed)
        return [rows.sort().values for rows in torch.split(mine, config.batch_size)]
    case_of_cloud = torch.as_tensor(dataset.case_of_point)[plan.queries.cpu()]
    chunks: list[torch.Tensor] = []
    for case_index in range(dataset.num_cases):
        rows = torch.nonzero(case_of_cloud == case_index).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        chunks.extend(chunk.sort().values for chunk in torch.split(rows, config.batch_size))
    order = torch.randperm(len(chunks), generator=generator)
    return [chunks[int(index)] for index in _shard(order, distributed)]


def _shard(order: torch.Tensor, distributed: _Distributed) -> torch.Tensor:
    """Every P-th element from the rank's offset, padded so that all ranks get equally many."""
    world = distributed.world_size
    if world == 1:
        return order
    per_rank = math.ceil(order.numel() / world)
    padded = torch.cat([order, order[: per_rank * world - order.numel()]])
    return padded[distributed.rank :: world]


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def _predict(
    training_pass: nn.Module,
    queries: torch.Tensor,
    indices: torch.Tensor,
    device: torch.device,
    amp: bool,
) -> torch.Tensor:
    """A :class:`~vcnn.engines.TrainingPass` (or DDP around it) on a row batch, as float32."""
    with _autocast(device, amp):
        output = training_pass(queries, indices)
    return output.float()


def _update_average(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """One step of the exponential moving average of the weights."""
    with torch.no_grad():
        for mean, value in zip(averaged.parameters(), model.parameters(), strict=True):
            mean.mul_(decay).add_(value.detach(), alpha=1.0 - decay)


def _data_physics(split: CaseSplit) -> Physics | None:
    """The physics of the training data; every case of every split must share it.

    Returns:
        The physics, or None when the cases record none (data of unknown origin).

    Raises:
        DatasetError: naming the cases whose physics differs or is malformed.
    """
    sources = [*split.train, *split.validation, *split.test]

    def physics_of(source: CaseSource) -> Physics | None:
        try:
            return Physics.from_case_meta(source.meta)
        except ValueError as error:
            raise DatasetError(f"case {source.name!r}: {error}") from error

    reference = physics_of(sources[0])
    for source in sources[1:]:
        other = physics_of(source)
        if (reference is None) != (other is None):
            differences = ["one records its physics, the other does not"]
        else:
            differences = [] if reference is None else reference.differences(other)
        if differences:
            raise DatasetError(
                f"cases {sources[0].name!r} and {source.name!r} were generated with different "
                f"physics ({'; '.join(differences)}); a closure learns one physics: train on "
                "cases of one physics"
            )
    return reference


def _evaluate_plan(
    training_pass: TrainingPass,
    dataset: CloudDataset,
    plan: CloudPlan,
    *,
    batch_size: int,
    distributed: _Distributed,
    device: torch.device,
    amp: bool,
    weighted: bool,
) -> _Sums:
    sums = _Sums()
    order = torch.arange(plan.queries.numel(), device=plan.queries.device)
    # No padding here: each rank evaluates a disjoint share, sums are reduced afterwards.
    mine = order[distributed.rank :: distributed.world_size]
    training_pass.eval()
    with torch.no_grad():
        for start in range(0, mine.numel(), batch_size):
            rows = mine[start : start + batch_size]
            queries = plan.queries[rows]
            prediction = _predict(training_pass, queries, plan.indices[rows], device, amp)
            sums.add(
                prediction,
                dataset.target[queries],
                dataset.volume[queries],
                weighted=weighted,
                count=rows.numel(),
            )
    return sums.reduced(distributed, device)


def _read_lcurve(path: Path, up_to_epoch: int) -> list[EpochRecord]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines()[1:]:
        values = line.split("\t")
        if len(values) != len(LCURVE_COLUMNS):
            continue
        record = EpochRecord(int(values[0]), *[float(v) for v in values[1:]])
        if record.epoch <= up_to_epoch:
            records.append(record)
    return records


def _write_lcurve(path: Path, history: list[EpochRecord]) -> None:
    lines = ["\t".join(LCURVE_COLUMNS)]
    for record in history:
        values = asdict(record)
        lines.append(
            "\t".join(
                str(values[c]) if c == "epoch" else f"{values[c]:.9g}" for c in LCURVE_COLUMNS
            )
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def _check_owner(out_dir: Path, config: TrainConfig) -> None:
    """Refuse a run folder that holds another verb's outputs (see vcnn.outputs)."""
    check_output_owner(
        out_dir,
        verb="train",
        overwrite=config.overwrite,
        continuing=config.resume,
        flag="--out",
    )


def _lock_run_folder(
    held: contextlib.ExitStack, out_dir: Path, config: TrainConfig, distributed: _Distributed
) -> None:
    """Lock the run folder on the main rank until ``held`` closes; every rank raises or none.

    Raises:
        UsageError: another run holds the folder (naming its pid), or it holds another
            verb's outputs now.
    """
    error: Exception | None = None
    if distributed.is_main:
        try:
            held.enter_context(
                output_lock(
                    out_dir,
                    verb="train",
                    flag="--out",
                    then=lambda: _check_owner(out_dir, config),
                )
            )
        except Exception as caught:  # shared below, so that no rank waits for the others
            error = caught
    if distributed.world_size > 1:
        shared = [None if error is None else one_line(error)]
        dist.broadcast_object_list(shared, src=0)
        if error is None and shared[0] is not None:
            raise UsageError(shared[0])
    if error is not None:
        raise error


# ------------------------------------------------------------------------------ train
def train(
    config: TrainConfig,
    *,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train a network as described by ``config`` (see the module docstring for the outputs).

    Args:
        config: the run's configuration.
        on_epoch_end: called on every rank after each epoch's checkpoint is written (e.g. to
            report progress elsewhere, or to stop the run by raising).

    Returns:
        The run's history and checkpoint paths (on every rank).

    Raises:
        ConfigError: on an inconsistent configuration.
        DatasetError / CaseFileError: on bad or missing case files or splits.
        CheckpointError: when ``resume`` finds an unusable ``last.pt``.
    """
    if config.target == "integral":  # the whole discretisation as one cloud per case
        from vcnn.training.integral import train_integral

        return train_integral(config, on_epoch_end=on_epoch_end)
    distributed = _init_distributed(config.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, until the run ends
            return _train(config, distributed, on_epoch_end, held)
    finally:
        if distributed.initialised_here:
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    distributed: _Distributed,
    on_epoch_end: Callable[[EpochRecord], None] | None,
    held: contextlib.ExitStack,
) -> TrainResult:
    is_main = distributed.is_main
    device = resolve_device(config.device, local_rank=distributed.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = bool(config.amp and device.type == "cuda")
    if config.amp and not amp and is_main:
        logger.warning("amp = true needs a CUDA device; training in float32 on %s", device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(config.out)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    lcurve_path = out_dir / "lcurve.tsv"
    # Before any work: a folder that holds another run is resumed or replaced, never mixed.
    replaced = check_run_folder(out_dir, resume=config.resume, overwrite=config.overwrite)
    _check_owner(out_dir, config)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))

    split = _make_split(config, log=is_main)
    spec = config.feature_spec()
    physics = _data_physics(split)
    initial = None if config.init_model is None else _load_initial_model(config.init_model)
    if initial is None:
        target_scaler = TargetScaler.fit(source.load() for source in split.train)
    else:  # fine-tuning: the target as the initial model learnt it
        target_scaler = TargetScaler(scale=initial.target_scale)
    cloud_options = CloudOptions.from_dict(config.cloud)
    if physics is not None:
        cloud_options = cloud_options.resolved(diffusivity=physics.diffusivity, zeta=physics.zeta)
    elif cloud_options.region == "ellipse" and None in (
        cloud_options.diffusivity,
        cloud_options.zeta,
    ):
        raise ConfigError(
            "the training cases record no physics: give the ellipse's operator as [cloud] "
            "diffusivity and zeta"
        )
    common = dict(
        spec=spec, target_scaler=target_scaler, cloud_options=cloud_options, device=device
    )
    if initial is None:
        train_data = CloudDataset(split.train, **common)
        # The normaliser sees clouds like those of training (a draw of its own, fixed seed).
        normalizer = train_data.fit_normalizer(
            train_data.draw(
                config.cloud_size,
                seed=derive_seed(config.seed, 2**31 - 2),
                queries_per_case=config.queries(),
            )
        )
    else:  # fine-tuning: the inputs as the initial model saw them
        normalizer = initial.normalizer
        train_data = CloudDataset(split.train, normalizer=normalizer, **common)
    _check_validation_target(split)
    validation_data = CloudDataset(split.validation, normalizer=normalizer, **common)

    model = _build_network(config, dim=train_data.dim, spec=spec)
    if initial is not None:
        check_initialisable(
            initial.metadata,
            path=config.init_model,
            model_kind=type(model).__name__,
            model_config=model.to_config(),
            feature_spec=spec.to_dict(),
        )
        model.load_state_dict(initial.state)
        if is_main:
            _log_initial_model(config.init_model, initial.metadata, physics)
    model.to(device=device, dtype=torch.float32)
    # The fused step: one pass over all parameters instead of a dozen small ops per tensor
    # (0.24 ms against 0.9 ms a step on two cores for the default net); same arithmetic.
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = build_scheduler(optimizer, config)
    # The model that is validated, selected and saved: the weights' moving average, or them.
    averaged = copy.deepcopy(model) if config.ema_decay else model

    start_epoch = 1
    init_record = None if initial is None else initial.record
    best = {"epoch": 0, "rel_l2_percent": math.inf, "epochs_without_improvement": 0}
    elapsed_before = 0.0
    history: list[EpochRecord] = []
    if config.resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path, map_location=device)
        check_resumable(
            checkpoint,
            path=last_path,
            config=config.to_dict(),
            split=split.names(),
            model_config=model.to_config(),
        )
        try:
            model.load_state_dict(checkpoint.get("training_model_state", checkpoint["model_state"]))
            averaged.load_state_dict(checkpoint["model_state"])
        except RuntimeError as error:
            raise CheckpointError(
                f"--resume: the weights in {str(last_path)!r} do not fit the network: {error}"
            ) from error
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])
        restore_rng_state(checkpoint["rng_state"])
        best = dict(checkpoint["best"])
        start_epoch = int(checkpoint["epoch"]) + 1
        elapsed_before = float(checkpoint.get("wall_clock_s", 0.0))
        history = _read_lcurve(lcurve_path, int(checkpoint["epoch"]))
        init_record = checkpoint.get("init_model")
        if is_main:
            logger.info("resuming from %s after epoch %d", last_path, start_epoch - 1)
        if isinstance(scheduler, CosineToFloor) and scheduler.extend(config.epochs) and is_main:
            logger.info(
                "epochs changed to %d: the cosine schedule continues from lr %.3e down to %.3e "
                "at epoch %d",
                config.epochs,
                scheduler.get_last_lr()[0],
                config.min_learning_rate,
                config.epochs,
            )
    elif config.resume and is_main:
        logger.info("resume requested but %s does not exist: starting afresh", last_path)

    # The training pass of each data set, bound once by the backend that runs it (the C
    # kernels of vcnn.engines.fused_cpu where they can). DistributedDataParallel wraps the
    # pass itself, so data-parallel training runs the same backend.
    train_pass = TrainingPass(model, train_data.table, normalizer)
    validation_pass = TrainingPass(averaged, validation_data.table, normalizer)

    network: nn.Module = train_pass
    if distributed.world_size > 1:
        network = nn.parallel.DistributedDataParallel(
            train_pass, device_ids=[device.index] if device.type == "cuda" else None
        )

    # The first write: the run folder is locked until the run ends (and checked again).
    _lock_run_folder(held, out_dir, config, distributed)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            for path in [*replaced, out_dir / "lcurve.png"]:
                path.unlink(missing_ok=True)
                logger.info("--overwrite: removed %s of the previous run", path)
        write_resolved_config(out_dir, {"train": config.to_dict(), "split": split.names()})
        logger.info(
            "training on %d cases (%d points), validating on %d, %d parameters, device %s, "
            "%d rank(s), engine %s",
            train_data.num_cases,
            train_data.num_points,
            validation_data.num_cases,
            sum(p.numel() for p in model.parameters()),
            device,
            distributed.world_size,
            train_pass.engine,
        )
    validation_plan = validation_data.draw(
        config.cloud_size,
        seed=derive_seed(config.seed, 2**31 - 1),
        queries_per_case=config.queries(validation=True),
    )

    # On a CUDA device the training clouds are searched once and drawn there every epoch
    # (vcnn.engines.device): no cloud or batch crosses from the host.
    device_draws = DeviceDraws(train_data) if device.type == "cuda" else None
    progress = _Progress(
        is_main and (config.progress if config.progress is not None else sys.stderr.isatty())
    )
    session_start = time.perf_counter()
    train_seconds = 0.0
    trained_clouds = 0
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if best["epochs_without_improvement"] >= (config.patience or math.inf):
            stopped_early = True
            break
        epoch_start = time.perf_counter()
        plan = (train_data if device_draws is None else device_draws).draw(
            config.cloud_size,
            seed=derive_seed(config.seed, epoch),
            queries_per_case=config.queries(),
        )
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, 1))
        epoch_batches = _epoch_batches(plan, train_data, config, generator, distributed)
        if device_draws is not None and epoch_batches:
            # one transfer of the epoch's batch order, none per batch
            sizes = [rows.numel() for rows in epoch_batches]
            epoch_batches = list(torch.cat(epoch_batches).to(device).split(sizes))
        batches = len(epoch_batches)
        if epoch == 1 and is_main and config.ema_decay:
            _warn_short_average(config, steps=batches * config.epochs)
        learning_rate = optimizer.param_groups[0]["lr"]
        sums = _Sums()
        network.train()
        for batch_index, rows in enumerate(epoch_batches):
            rows = rows.to(device)
            queries = plan.queries[rows]
            target = train_data.target[queries]
            prediction = _predict(network, queries, plan.indices[rows], device, amp)
            loss = torch.mean((prediction - target) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not model:
                _update_average(averaged, model, config.ema_decay)
            sums.add(
                prediction,
                target,
                train_data.volume[queries],
                weighted=config.volume_weighted_metrics,
                count=rows.numel(),
            )
            progress.update(epoch, config.epochs, batch_index + 1, batches, loss.detach())
        scheduler.step()
        train_seconds += time.perf_counter() - epoch_start
        trained_clouds += plan.queries.numel()
        train_sums = sums.reduced(distributed, device)

        validation_sums = _evaluate_plan(
            validation_pass,
            validation_data,
            validation_plan,
            batch_size=config.batch_size,
            distributed=distributed,
            device=device,
            amp=amp,
            weighted=config.volume_weighted_metrics,
        )
        score = validation_sums.rel_l2_percent
        # The sums are reduced over the ranks, so every rank takes the same decision here.
        for what, value in (
            ("training", train_sums.mean_loss),
            ("validation", validation_sums.mean_loss),
        ):
            if not math.isfinite(value):
                kept = "no checkpoint was written"
                if epoch > 1:
                    kept = f"last.pt keeps epoch {epoch - 1}"
                    if best["epoch"] > 0:
                        kept += f", best.pt epoch {best['epoch']}"
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch}: the {what} loss is {value}; {kept} "
                    f"(in {str(out_dir)!r}); lower the learning rate "
                    f"({config.learning_rate:g}) or check the case files"
                )
        improved = score < best["rel_l2_percent"] - config.min_delta
        if improved:
            best = {"epoch": epoch, "rel_l2_percent": score, "epochs_without_improvement": 0}
        else:
            best["epochs_without_improvement"] += 1

        wall_clock = elapsed_before + time.perf_counter() - session_start
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_sums.mean_loss,
            validation_loss=validation_sums.mean_loss,
            train_rel_l2_percent=train_sums.rel_l2_percent,
            validation_rel_l2_percent=validation_sums.rel_l2_percent,
            learning_rate=learning_rate,
            wall_clock_s=wall_clock,
        )
        history.append(record)
        if is_main:
            progress.close()
            logger.info(
                "epoch %d/%d: train loss %.4e, rel L2 %.3f %% | validation loss %.4e, "
                "rel L2 %.3f %% | lr %.3e | %.1f s",
                epoch,
                config.epochs,
                record.train_loss,
                record.train_rel_l2_percent,
                record.validation_loss,
                record.validation_rel_l2_percent,
                learning_rate,
                wall_clock,
            )
            payload = {
                "model_kind": type(model).__name__,
                "model_config": model.to_config(),
                "model_state": averaged.state_dict(),
                "feature_normalizer": normalizer.state_dict(),
                "feature_spec": spec.to_dict(),
                "target_scale": target_scaler.scale,
                "cloud_options": cloud_options.to_dict(),
                "physics": None if physics is None else physics.to_dict(),
                "dimension": train_data.dim,
                "cloud_size": config.cloud_size,
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                **({} if averaged is model else {"training_model_state": model.state_dict()}),
                "rng_state": capture_rng_state(),
                "epoch": epoch,
                "seed": config.seed,
                "best": dict(best),
                "wall_clock_s": wall_clock,
                "train_config": config.to_dict(),
                "split": split.names(),
                "versions": package_versions(),
                **({} if init_record is None else {"init_model": init_record}),
            }
            _write_lcurve(lcurve_path, history)
            save_checkpoint(last_path, payload)
            if improved:
                save_checkpoint(best_path, payload)
        if distributed.world_size > 1:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(record)
        out_of_time = (
            config.time_limit_minutes is not None and wall_clock >= 60 * config.time_limit_minutes
        )
        if distributed.world_size > 1:  # ranks' clocks differ: rank 0 decides for all
            decision = torch.tensor([float(out_of_time)], device=device)
            dist.broadcast(decision, src=0)
            out_of_time = bool(decision.item())
        if out_of_time:
            if is_main:
                logger.info(
                    "time limit of %g min reached after epoch %d", config.time_limit_minutes, epoch
                )
            break

    if is_main and history:
        from vcnn.plotting.training import plot_learning_curves

        try:
            plot_learning_curves(history, out_dir / "lcurve.png", best_epoch=best["epoch"] or None)
        except (OSError, ValueError) as error:  # a figure must never lose a trained model
            logger.warning("could not draw the learning curves: %s", error)
    if stopped_early and is_main:
        logger.info(
            "early stop after epoch %d: no validation improvement for %d epochs (best: epoch %d)",
            epoch - 1,
            config.patience,
            best["epoch"],
        )
    return TrainResult(
        out_dir=out_dir,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        history=history,
        best_epoch=int(best["epoch"]),
        best_validation_rel_l2_percent=float(best["rel_l2_percent"]),
        stopped_early=stopped_early,
        seed=config.seed,
        clouds_per_second=trained_clouds / train_seconds if train_seconds > 0 else math.nan,
        split=split.names(),
        model=averaged,
        engine=train_pass.engine,
    )


__all__ = [
    "LCURVE_COLUMNS",
    "SCHEDULERS",
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "resolve_device",
    "train",
]
