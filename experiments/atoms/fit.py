"""Training an atomic energy model on energies and forces together, and its error measures.

The loss of a batch of configurations is DeePMD's: both errors in units of the data,

    p_E(t) mean(((E_pred - E) / N / energy_unit)^2) + p_F(t) mean(|F_pred - F|^2 / 3) / f^2,

with ``f`` the RMS force component of the training set and the forces ``-dE/dx`` of the model
by autograd (``create_graph=True``, so the loss is differentiated through them). The weights
follow the learning rate, p(t) = p_final + (p_start - p_final) lr(t) / lr(0): training starts
force-dominated (a force carries 3N numbers per configuration, the energy one) and ends with
the energy weighted in. Adam with an exponentially decaying learning rate. Before the first
step the descriptor standardisation of the model is set from the training configurations
(:meth:`vcnn.atoms.AtomicEnergyModel.standardise_descriptor`).

Measured on the quick data set (100 training configurations of 108 atoms, 300 steps of 4
configurations, held-out force error): a plain loss with fixed weights and an energy scale of
the force RMS, 65 %; the descriptor standardised, 60 %; plus the 1/r-spaced radial basis and a
unit energy scale, 51 %; plus the force-first weights above, 22 %; plus a final learning rate
of a tenth rather than a hundredth of the first, 10 %.

On the full data set (340 training configurations, 2000 steps of 4, then the refit of the
last layer; held-out energy MAE per atom and force error): the pooled moments divided by the
per-atom ``self_weight + sum_j s_j`` (``pooling_normaliser="cloud"``), 8.4e-3 and 4.08 %
before the refit, 5.0e-3 and 4.01 % after; divided by a constant (``"fixed"``, now the
default of :func:`model_config`), 4.8e-3 and 3.62 % before, 4.0e-3 and 3.48 % after. The
energy error is not set by the model's cutoff: a linear least-squares pair model
``sum_pairs s(r) g(r)`` with ``g`` in the model's radial basis (the same switch from 2.0 to
2.5) fits the shifted-force energies to 3e-5 per atom and the forces to 0.1 %.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from experiments.atoms.lj import AtomsData
from vcnn.atoms import AtomicEnergyModel, AtomicModelConfig, neighbour_clouds

logger = logging.getLogger(__name__)


def model_config(
    data: AtomsData,
    *,
    cutoff: float = 2.5,
    inner: float = 2.0,
    pooling_normaliser: str = "fixed",
    linear_term: bool = True,
) -> AtomicModelConfig:
    """Model settings from training data: the mean energy per atom and neighbour weight.

    ``linear_term`` (:class:`vcnn.atoms.AtomicModelConfig`): a term linear in the
    standardised descriptor beside the fitting net, which the refit
    (:func:`refit_output_layer`) solves for with the last layer.

    ``pooling_normaliser`` (:class:`vcnn.atoms.AtomicModelConfig`): ``"fixed"`` (the default)
    pools neighbour sums over a constant, twice the mean neighbour weight sum of the data, so
    every cloud's own weight stays positive and about the size of the ``"cloud"``
    normaliser's self weight (the mean neighbour weight sum).
    """
    sample = data.positions[: min(len(data), 16)]
    clouds = neighbour_clouds(sample, cutoff=cutoff, inner=inner, box=data.box)
    atoms = data.positions.shape[1]
    neighbour_weight = float(clouds.weight.sum(-1).mean())
    return AtomicModelConfig(
        cutoff=cutoff,
        inner=inner,
        self_weight=2.0 * neighbour_weight if pooling_normaliser == "fixed" else neighbour_weight,
        pooling_normaliser=pooling_normaliser,
        linear_term=linear_term,
        energy_offset=float((data.energy / atoms).mean()),
        # a unit scale: with the descriptor standardised, the fitting net's output varies by
        # O(1) from atom to atom, the size of the per-atom energies' spread; scaling it by
        # the force RMS (about 20) made every Adam step move the energies by several epsilon
        energy_scale=1.0,
    )


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings.

    Attributes:
        steps: optimiser steps.
        batch: configurations per step (at most the training set).
        learning_rate: initial Adam rate.
        final_learning_rate: rate at the last step (exponential decay in between).
        start_energy_weight: p_E at the first step.
        final_energy_weight: p_E at a vanishing learning rate.
        start_force_weight: p_F at the first step.
        final_force_weight: p_F at a vanishing learning rate.
        energy_unit: energy per atom (epsilon) that the energy error is measured in; about
            the spread of the energy per atom of the liquid samples. Fixed rather than taken
            from the data so that one configuration trains with the same loss as a hundred.
        dtype: ``"float32"`` or ``"float64"`` for training (MD and checks use float64).
        seed: seed of the initial weights and batch order.
        refit_output_layer: after the optimiser, set the fitting net's last layer to the exact
            minimiser of the final loss (:func:`refit_output_layer`).
        refit_force_configurations: configurations whose forces enter that refit (their
            force rows cost one backward pass per hidden unit; every energy enters).
        refit_energy_weight: p_E of the refit's loss (p_F is ``final_force_weight``). The
            refit moves only the last layer, so a heavier energy weight costs the forces
            little: on the saved full-run model (340 training configurations) held-out
            energy MAE per atom 1.91e-3 at p_E = 1, 1.69e-3 at 10 (forces 1.76 -> 1.72 %),
            1.67e-3 at 100 and 1000 (forces 1.78 and 1.79 %).
    """

    steps: int = 3000
    batch: int = 4
    learning_rate: float = 5e-3
    final_learning_rate: float = 5e-4
    start_energy_weight: float = 0.02
    final_energy_weight: float = 1.0
    start_force_weight: float = 1000.0
    final_force_weight: float = 1.0
    energy_unit: float = 0.3
    dtype: str = "float32"
    seed: int = 0
    refit_output_layer: bool = False
    refit_force_configurations: int = 32
    refit_energy_weight: float = 10.0


@dataclass(frozen=True)
class Errors:
    """Errors of a model on a set of configurations.

    Attributes:
        energy_mae_per_atom: mean |E_pred - E| / N.
        force_rel_rmse_percent: 100 sqrt(sum |F_pred - F|^2 / sum |F|^2).
        force_rmse: sqrt(mean of the squared force-component errors).
        configurations: how many configurations were evaluated.
    """

    energy_mae_per_atom: float
    force_rel_rmse_percent: float
    force_rmse: float
    configurations: int


def evaluate(model: AtomicEnergyModel, data: AtomsData, *, chunk: int = 8) -> Errors:
    """Energy and force errors of ``model`` on ``data`` (in the model's dtype)."""
    dtype = next(model.parameters()).dtype
    atoms = data.positions.shape[1]
    energy_error, force_error, force_norm = [], 0.0, 0.0
    for start in range(0, len(data), chunk):
        part = data.subset(slice(start, start + chunk))
        prediction = model.energy_and_forces(part.positions.to(dtype), box=data.box)
        energy_error.append((prediction.energy.double() - part.energy).abs() / atoms)
        force_error += float(((prediction.forces.double() - part.forces) ** 2).sum())
        force_norm += float((part.forces**2).sum())
    components = len(data) * atoms * data.positions.shape[2]
    return Errors(
        energy_mae_per_atom=float(torch.cat(energy_error).mean()),
        force_rel_rmse_percent=100.0 * math.sqrt(force_error / force_norm),
        force_rmse=math.sqrt(force_error / components),
        configurations=len(data),
    )


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (float64 parameters, ready for MD and the symmetry check).
        loss: (steps,) float64, the training loss of every step.
        seconds: wall time of the optimisation.
    """

    model: AtomicEnergyModel
    loss: np.ndarray
    seconds: float


@dataclass(frozen=True)
class OutputLayerRows:
    """The final loss as a linear least-squares problem in the output parameters.

    The energy is affine in the last layer's weights w and bias b and in the weights v of the
    linear term, if the model has one (``E_i = offset + scale (w . h_i + b + v . z_i)`` with
    h_i the last hidden layer and z_i the standardised descriptor of atom i), and so are the
    forces, so the loss of :func:`train` at its final weights is a quadratic in
    theta = (w, b[, v]).

    Attributes:
        energy_rows: (C, P) float64, dE/dtheta of each configuration (P = K + 1, plus the
            descriptor width with the linear term).
        energy_rest: (C,) float64, the energy that does not depend on theta.
        force_rows: (C_f, N, d, P) float64, dF/dtheta of the force configurations.
        force_rest: (C_f, N, d) float64.
    """

    energy_rows: torch.Tensor
    energy_rest: torch.Tensor
    force_rows: torch.Tensor
    force_rest: torch.Tensor


def output_layer_rows(
    model: AtomicEnergyModel, data: AtomsData, *, force_configurations: int, chunk: int = 4
) -> OutputLayerRows:
    """The rows of :class:`OutputLayerRows` for ``data`` (model in float64).

    Force rows come from the first ``force_configurations`` configurations (one batched
    backward pass per parameter of theta); energy rows from every configuration (forward only).
    """
    standardisation = model.standardisation
    last = standardisation.inner.layers[-1]
    if last.out_features != 1:
        raise ValueError("the fitting net must end in one output")
    scale = model.config.energy_scale
    linear = standardisation.linear
    parts = [last.weight.detach()[0], last.bias.detach()]
    if linear is not None:
        parts.append(linear.weight.detach()[0])
    theta = torch.cat(parts).double()
    energy_rows, energy_rest, force_rows, force_rest = [], [], [], []
    for start in range(0, len(data), chunk):
        part = data.subset(slice(start, start + chunk))
        with_forces = start < force_configurations
        positions = part.positions.double().detach().requires_grad_(with_forces)
        captured: dict[str, torch.Tensor] = {}
        hooks = [last.register_forward_hook(
            lambda module, inputs, output: captured.__setitem__("hidden", inputs[0]))]
        if linear is not None:
            hooks.append(linear.register_forward_hook(
                lambda module, inputs, output: captured.__setitem__("descriptor", inputs[0])))
        try:
            with torch.set_grad_enabled(with_forces):
                energy = model(positions, box=data.box)
        finally:
            for hook in hooks:
                hook.remove()
        batch, atoms, _ = positions.shape
        hidden_sum = captured["hidden"].reshape(batch, atoms, -1).sum(dim=1)  # (B, K)
        columns = [hidden_sum, hidden_sum.new_full((batch, 1), atoms)]
        if linear is not None:
            columns.append(captured["descriptor"].reshape(batch, atoms, -1).sum(dim=1))
        rows = scale * torch.cat(columns, dim=1)  # (B, P)
        energy_rows.append(rows.detach())
        energy_rest.append(energy.detach() - rows.detach() @ theta)
        if not with_forces:
            continue
        width = rows.shape[1]
        unit = torch.eye(width, dtype=rows.dtype)[:, None, :].expand(width, batch, width)
        (rows_gradient,) = torch.autograd.grad(
            rows, positions, grad_outputs=unit, is_grads_batched=True, retain_graph=True
        )
        (energy_gradient,) = torch.autograd.grad(energy.sum(), positions)
        rows_f = -rows_gradient.permute(1, 2, 3, 0)  # (B, N, d, P)
        force_rows.append(rows_f)
        force_rest.append(-energy_gradient - rows_f @ theta)
    return OutputLayerRows(
        energy_rows=torch.cat(energy_rows),
        energy_rest=torch.cat(energy_rest),
        force_rows=torch.cat(force_rows),
        force_rest=torch.cat(force_rest),
    )


def refit_output_layer(
    model: AtomicEnergyModel, data: AtomsData, settings: TrainSettings
) -> AtomicEnergyModel:
    """Set the output parameters to the minimiser of the final loss of :func:`train` (in place).

    The loss at the final weights, ``p_E mean((dE / N / energy_unit)^2) + p_F mean(dF^2) /
    f^2`` (p_E = ``settings.refit_energy_weight``, p_F = ``settings.final_force_weight``), is
    quadratic in the last layer's (w, b) and the linear term's weights, if the model has one
    (:class:`OutputLayerRows`): its normal equations are solved exactly
    (energies of every configuration, forces of ``settings.refit_force_configurations``; each
    term is a mean over its own rows). Adam leaves that layer where its noise lets it; the
    solve cannot raise the loss of the rows it sees. Measured on the quick data set (100
    training configurations, the quick recipe): held-out energy MAE per atom 7.9e-3 ->
    3.9e-3, force error 3.42 % -> 3.18 %.

    Args:
        model: a trained model (converted to float64).
        data: the training configurations.
        settings: the weights and units of the final loss.

    Returns:
        The model, its last layer (and linear term) replaced.
    """
    model = model.to(torch.float64)
    rows = output_layer_rows(
        model, data, force_configurations=settings.refit_force_configurations
    )
    atoms = data.positions.shape[1]
    force_unit = float(data.forces.pow(2).mean().sqrt())
    forces = data.forces[: rows.force_rows.shape[0]].double()
    energy_weight = settings.refit_energy_weight / (
        rows.energy_rows.shape[0] * (atoms * settings.energy_unit) ** 2
    )
    force_weight = settings.final_force_weight / (forces.numel() * force_unit**2)
    force_rows = rows.force_rows.reshape(-1, rows.force_rows.shape[-1])
    normal = (energy_weight * rows.energy_rows.T @ rows.energy_rows
              + force_weight * force_rows.T @ force_rows)
    right = (energy_weight * rows.energy_rows.T @ (data.energy.double() - rows.energy_rest)
             + force_weight * force_rows.T @ (forces - rows.force_rest).reshape(-1))
    # a relative ridge of round-off size: hidden units can be nearly collinear
    normal += 1e-12 * normal.diagonal().mean() * torch.eye(normal.shape[0], dtype=normal.dtype)
    theta = torch.linalg.solve(normal, right)
    last = model.standardisation.inner.layers[-1]
    hidden = last.in_features
    with torch.no_grad():
        last.weight[0].copy_(theta[:hidden])
        last.bias.copy_(theta[hidden : hidden + 1])
        if model.standardisation.linear is not None:
            model.standardisation.linear.weight[0].copy_(theta[hidden + 1 :])
    return model


def train(model: AtomicEnergyModel, data: AtomsData, settings: TrainSettings) -> TrainResult:
    """Fit ``model`` to the energies and forces of ``data``.

    Args:
        model: an untrained model (its config from :func:`model_config`), or a trained one
            to train further: its descriptor standardisation is then kept, since the fitting
            net's weights were fitted to it (a fresh optimiser state all the same).
        data: the training configurations.
        settings: optimisation settings.

    Returns:
        A :class:`TrainResult`; the model is converted to float64 at the end.
    """
    dtype = getattr(torch, settings.dtype)
    if not model.standardisation.is_set:
        # statistics in float64 from (up to) 16 configurations, then the training dtype
        model.to(torch.float64).standardise_descriptor(data.positions[:16], box=data.box)
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(settings.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    decay = (settings.final_learning_rate / settings.learning_rate) ** (1.0 / max(settings.steps, 1))
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=decay)
    positions = data.positions.to(dtype)
    energy = data.energy.to(dtype)
    forces = data.forces.to(dtype)
    atoms = positions.shape[1]
    force_unit = float(data.forces.pow(2).mean().sqrt())
    batch = min(settings.batch, len(data))
    order = torch.randperm(len(data), generator=generator)
    cursor = 0
    losses = np.empty(settings.steps)
    started = time.perf_counter()
    for step in range(settings.steps):
        if cursor + batch > len(data):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        prediction = model.energy_and_forces(positions[index], box=data.box, create_graph=True)
        energy_loss = (((prediction.energy - energy[index]) / atoms) ** 2).mean()
        force_loss = ((prediction.forces - forces[index]) ** 2).mean()
        progress = optimiser.param_groups[0]["lr"] / settings.learning_rate
        energy_weight = settings.final_energy_weight + progress * (
            settings.start_energy_weight - settings.final_energy_weight
        )
        force_weight = settings.final_force_weight + progress * (
            settings.start_force_weight - settings.final_force_weight
        )
        loss = (energy_weight * energy_loss / settings.energy_unit**2
                + force_weight * force_loss / force_unit**2)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses[step] = float(loss.detach())
        if step % max(settings.steps // 10, 1) == 0:
            logger.info(
                "step %d/%d: loss %.3e (energy/atom rmse %.2e, force rmse %.2f %% of RMS)",
                step, settings.steps, losses[step], math.sqrt(float(energy_loss.detach())),
                100.0 * math.sqrt(float(force_loss.detach())) / force_unit,
            )
    model = model.to(torch.float64)
    if settings.refit_output_layer:
        refit_started = time.perf_counter()
        model = refit_output_layer(model, data, settings)
        logger.info("last layer refitted by least squares (%.0f s)",
                    time.perf_counter() - refit_started)
    seconds = time.perf_counter() - started
    return TrainResult(model=model, loss=losses, seconds=seconds)


__all__ = [
    "Errors",
    "OutputLayerRows",
    "TrainResult",
    "TrainSettings",
    "evaluate",
    "model_config",
    "output_layer_rows",
    "refit_output_layer",
    "train",
]
