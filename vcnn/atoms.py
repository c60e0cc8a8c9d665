"""A potential energy of atoms from the vector-cloud network: E = sum_i E_i, forces = -dE/dx.

The per-atom energy ``E_i`` is the network of the closures (:class:`vcnn.network.VectorCloudNet`,
or :class:`vcnn.network.BaselineNet` for the non-symmetric baseline) evaluated on atom ``i``'s
neighbour cloud: the relative positions ``x_j - x_i`` (minimum image in a periodic cubic box) of
the atoms within ``cutoff``, each with a smooth cutoff weight

    s(r) = 1 for r <= inner,   1 - t^3 (10 - 15 t + 6 t^2), t = (r - inner) / (cutoff - inner),

which falls to 0 with zero first and second derivatives at ``cutoff``, so the energy is twice
continuously differentiable in the positions and an atom crossing the cutoff sphere changes
nothing abruptly (molecular dynamics conserves energy). Atoms have no per-point vectors; the
one per-point scalar is the inverse distance 1/r (0 for the atom itself), which resolves the
steep short-range repulsion better than r (DeepPot-SE's s(r) = 1/r for the same reason); the
network derives r itself as well.

Pooling. The network pools a weighted *mean* over its cloud (invariant to duplicating points),
while an energy must grow with the number of neighbours. The atom itself is therefore a point of
its own cloud (relative position 0) with a fixed weight ``self_weight`` (about the mean
neighbour count): the pooled moments become ``sum_j s_j G_j Q_j / (self_weight + sum_j s_j)``,
DeepPot-SE's sum over neighbours with a fixed normaliser, up to a smooth density factor. With
``pooling_normaliser="fixed"`` the atom's own weight is ``self_weight - sum_j s_j`` instead,
which removes that factor: the pooled moments are exactly neighbour sums over the constant
``self_weight``, so a pair energy needs no division undone by the fitting net (it halved the
energy error of a short training on the Lennard-Jones data; ``experiments/atoms/fit.py``).
The self point sits at the atom in every frame, so no symmetry is lost. Being a mean over some 50
points, the descriptor hardly varies from atom to atom; a fixed standardisation in front of the
fitting net (:class:`StandardisedInput`, set from training data by
:meth:`AtomicEnergyModel.standardise_descriptor`) makes those variations O(1), without which
training stalls (``experiments/atoms/fit.py`` gives the measurements). With
``linear_term=True`` the per-atom energy also gets a term linear in that standardised
descriptor, besides the fitting net: with the fixed normaliser a pair energy is linear in the
descriptor, so this path holds the pair part exactly where a tanh or SiLU fitting net only
approximates it, and a least-squares refit finds its weights exactly.

Symmetries (checked in float64 by :func:`vcnn.symmetry.check_point_set_symmetry`): the energy
is invariant and the forces equivariant under translations and permutations of the atoms and,
for a free cluster, under every rotation and reflection; in a periodic cubic box under the 48
symmetries of the cube (other rotations change the lattice of periodic images, hence the
physics).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcnn.atomic import atomic_write
from vcnn.network import BaselineNet, VectorCloudNet

logger = logging.getLogger(__name__)

#: ``kind`` of an atoms checkpoint (what :func:`save_atomic_model` writes).
CHECKPOINT_KIND = "atoms-energy"


def smooth_cutoff(distance: torch.Tensor, *, inner: float, cutoff: float) -> torch.Tensor:
    """The smooth cutoff weight s(r): 1 inside ``inner``, 0 from ``cutoff`` on, C2 between.

    Args:
        distance: (...) float, distances r >= 0.
        inner: where the switch starts (0 <= inner < cutoff).
        cutoff: where the weight reaches 0.

    Returns:
        (...) float in [0, 1], the dtype of ``distance``.
    """
    t = ((distance - inner) / (cutoff - inner)).clamp(0.0, 1.0)
    # clamped: in float32 the polynomial ends a rounding error below 0 at t = 1
    return (1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t * t)).clamp(min=0.0)


@dataclass(frozen=True)
class NeighbourClouds:
    """Every atom's neighbour cloud, padded to the largest one of the batch.

    Attributes:
        relative: (B, N, n, d) float, ``x_j - x_i`` (minimum image), differentiable in the
            positions; zero at padding slots.
        weight: (B, N, n) float, the smooth cutoff weight s(|x_j - x_i|); zero at padding.
        distance: (B, N, n) float, |x_j - x_i|; 1 at padding (finite features there).
        mask: (B, N, n) bool, True for real neighbours.
        neighbours: (B, N, n) int64, the index j of each slot (i itself at padding slots).
    """

    relative: torch.Tensor
    weight: torch.Tensor
    distance: torch.Tensor
    mask: torch.Tensor
    neighbours: torch.Tensor


def check_box(box: float | None, cutoff: float) -> None:
    """Raise ValueError unless the minimum image convention holds (cutoff <= box / 2)."""
    if box is None:
        return
    if not box > 0:
        raise ValueError(f"the box edge must be positive, got {box}")
    if cutoff > box / 2:
        raise ValueError(
            f"cutoff {cutoff} exceeds half the box edge {box / 2:g}: the minimum image "
            f"convention would miss periodic neighbours; use a larger box or a smaller cutoff"
        )


def minimum_image_shift(difference: torch.Tensor, box: float | None) -> torch.Tensor:
    """The lattice vector that brings a difference of positions to its minimum image.

    Args:
        difference: (..., d) float, ``x_j - x_i``.
        box: edge of the periodic cubic box, or None (no periodicity: zero shift).

    Returns:
        (..., d) float, ``-box * round(difference / box)``; piecewise constant, so it carries
        no gradient.
    """
    if box is None:
        return torch.zeros_like(difference)
    return -box * torch.round(difference.detach() / box)


def neighbour_clouds(
    positions: torch.Tensor, *, cutoff: float, inner: float, box: float | None
) -> NeighbourClouds:
    """Each atom's neighbours within ``cutoff`` (all pairs, vectorised: fine for a few hundred).

    Args:
        positions: (B, N, d) float, atom positions (any image: the shift is recomputed).
        cutoff: neighbour cutoff radius.
        inner: start of the smooth switch (see :func:`smooth_cutoff`).
        box: edge of the periodic cubic box, or None for a free cluster.

    Returns:
        A :class:`NeighbourClouds` whose ``relative`` keeps the autograd graph of
        ``positions``.

    Raises:
        ValueError: on a box smaller than twice the cutoff or positions not (B, N, d).
    """
    if positions.ndim != 3:
        raise ValueError(f"positions must be (B, N, d), got shape {tuple(positions.shape)}")
    check_box(box, cutoff)
    batch, count, dim = positions.shape
    with torch.no_grad():
        difference = positions[:, None, :, :] - positions[:, :, None, :]  # (B, i, j, d)
        shift = minimum_image_shift(difference, box)
        distance = torch.linalg.vector_norm(difference + shift, dim=-1)
        itself = torch.eye(count, dtype=torch.bool, device=positions.device)
        within = (distance < cutoff) & ~itself
        width = max(int(within.sum(-1).max()) if count else 0, 1)
        # neighbours first, in index order (a stable sort of "not within")
        order = torch.argsort((~within).to(torch.int8), dim=-1, stable=True)[..., :width]
        mask = torch.take_along_dim(within, order, dim=-1)
        shift = torch.take_along_dim(shift, order[..., None], dim=2)
        rows = torch.arange(count, device=positions.device)[None, :, None]
        neighbours = torch.where(mask, order, rows)
    gathered = torch.take_along_dim(
        positions[:, None, :, :], neighbours.reshape(batch, 1, -1)[..., None], dim=2
    ).reshape(batch, count, width, dim)
    relative = torch.where(mask[..., None], gathered - positions[:, :, None, :] + shift, 0.0)
    # a padding slot gets distance 1 before the sqrt: no NaN gradient from sqrt(0)
    squared = torch.where(mask, (relative * relative).sum(-1), torch.ones_like(relative[..., 0]))
    distance = squared.sqrt()
    weight = torch.where(mask, smooth_cutoff(distance, inner=inner, cutoff=cutoff), 0.0)
    return NeighbourClouds(
        relative=relative,
        weight=weight,
        distance=distance,
        mask=mask,
        neighbours=neighbours,
    )


@dataclass(frozen=True)
class AtomicModelConfig:
    """Settings of an :class:`AtomicEnergyModel` besides its network.

    Attributes:
        cutoff: neighbour cutoff radius (length units of the positions).
        inner: start of the smooth switch of the cutoff weight.
        self_weight: pooling weight of the atom itself in its own cloud (see the module
            docstring); about the mean neighbour count.
        energy_offset: per-atom energy added to every network output (the training set's
            mean energy per atom).
        energy_scale: factor of the network output.
        radial_basis: number K of Gaussian radial basis functions fed to the embedding as
            scalars (besides 1/r). They let the first layer represent any smooth radial
            function almost linearly, which makes the fit converge far faster than from r and
            1/r alone (SchNet's expansion; still a generic function of r).
        radial_start: the shortest distance the basis resolves (about the closest approach of
            atoms).
        radial_variable: ``"inverse"``: centres evenly spaced in s = 1/r from 1/cutoff to
            1/radial_start, width their spacing, so the basis is densest where a repulsive
            wall is steepest (a linear least-squares pair fit of the Lennard-Jones forces
            with 16 functions: 0.8 % held-out error, against 5 % for the same number evenly
            spaced in r); ``"distance"``: evenly spaced in r from ``radial_start`` to
            ``cutoff``.
        pooling_normaliser: ``"cloud"``: the atom itself has the fixed weight
            ``self_weight``, so the pooled moments are neighbour sums divided by
            ``self_weight + sum_j s_j``, which varies from atom to atom; ``"fixed"``: the atom's
            own weight is ``self_weight - sum_j s_j`` (clamped at 0, reached only far above
            the training densities), so every cloud's weights add up to ``self_weight`` and
            the pooled moments are neighbour sums over a constant (DeepPot-SE's sum pooling):
            a pair energy is then exactly representable (a linear fitting net of the scalar
            channel) instead of the fitting net having to undo a per-atom density factor. Set
            ``self_weight`` well above the largest neighbour weight sum
            (``experiments/atoms/fit.py`` takes twice the mean).
        linear_term: add a term linear in the standardised descriptor to the fitting net's
            output (:class:`StandardisedInput`; zero at initialisation). With the fixed
            normaliser a pair energy is linear in the descriptor, so this path represents
            the pair part exactly. Checkpoints without the key load with False.
    """

    cutoff: float = 2.5
    inner: float = 2.0
    self_weight: float = 50.0
    energy_offset: float = 0.0
    energy_scale: float = 1.0
    radial_basis: int = 16
    radial_start: float = 0.75
    radial_variable: str = "inverse"
    pooling_normaliser: str = "cloud"
    linear_term: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.inner < self.cutoff:
            raise ValueError(f"need 0 <= inner < cutoff, got inner={self.inner}, "
                             f"cutoff={self.cutoff}")
        if not self.self_weight > 0:
            raise ValueError(f"self_weight must be positive, got {self.self_weight}")
        if self.radial_basis < 0 or not 0 < self.radial_start < self.cutoff:
            raise ValueError("need radial_basis >= 0 and 0 < radial_start < cutoff")
        if self.radial_variable not in ("inverse", "distance"):
            raise ValueError(f"radial_variable must be 'inverse' or 'distance', got "
                             f"{self.radial_variable!r}")
        if self.pooling_normaliser not in ("cloud", "fixed"):
            raise ValueError(f"pooling_normaliser must be 'cloud' or 'fixed', got "
                             f"{self.pooling_normaliser!r}")

    @property
    def num_scalars(self) -> int:
        """Scalars per cloud point: 1/r and the radial basis."""
        return 1 + self.radial_basis

    def point_scalars(self, distance: torch.Tensor) -> torch.Tensor:
        """The per-point scalars of neighbours at ``distance`` (...,) -> (..., num_scalars)."""
        inverse = 1.0 / distance[..., None]
        parts = [inverse]
        if self.radial_basis:
            if self.radial_variable == "inverse":
                variable, low, high = inverse, 1.0 / self.cutoff, 1.0 / self.radial_start
            else:
                variable, low, high = distance[..., None], self.radial_start, self.cutoff
            centres = torch.linspace(
                low, high, self.radial_basis, dtype=distance.dtype, device=distance.device
            )
            spacing = (high - low) / max(self.radial_basis - 1, 1)
            parts.append(torch.exp(-(((variable - centres) / spacing) ** 2)))
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class EnergyForces:
    """Energies and forces of a batch of configurations.

    Attributes:
        energy: (B,) float, total potential energy of each configuration.
        forces: (B, N, d) float, ``-dE/dx``.
    """

    energy: torch.Tensor
    forces: torch.Tensor


class StandardisedInput(nn.Module):
    """A fixed standardisation z = (x - shift) / scale, then ``inner(z)`` [+ ``linear(z)``].

    The fitting net's input (the descriptor, a weighted mean over some 50 neighbours) is
    nearly the same for every atom: one neighbour moves it by about 1/50 of its size, and on
    Lennard-Jones liquid data its components vary by 1e-4 to 1e-3 about means of up to 2e-2.
    Without rescaling, the fitting net must grow its weights a thousandfold before the forces
    (which come from exactly those small variations) are resolved, and training stalls.
    DeePMD-kit standardises its environment matrix for the same reason. The shift and scale
    are buffers (saved with the weights, not trained), set from training configurations by
    :meth:`AtomicEnergyModel.standardise_descriptor`; identity until then.

    Args:
        inner: the fitting MLP; its first layer's ``in_features`` is the width, its last
            layer's ``out_features`` the output width.
        linear_term: add ``linear(z)``, a bias-free linear map initialised at zero (so it
            changes nothing until trained; the inner net's last bias is the constant).
    """

    def __init__(self, inner: nn.Module, *, linear_term: bool = False) -> None:
        super().__init__()
        self.inner = inner
        width = int(inner.layers[0].in_features)
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.linear: nn.Linear | None = None
        if linear_term:
            self.linear = nn.Linear(width, int(inner.layers[-1].out_features), bias=False)
            nn.init.zeros_(self.linear.weight)

    @property
    def is_set(self) -> bool:
        """Whether the standardisation was set (it is the identity until then)."""
        return bool(self.shift.any() or (self.scale != 1).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., width) float -> (..., outputs): the inner net's output [+ the linear term]."""
        standardised = (x - self.shift) / self.scale
        output = self.inner(standardised)
        if self.linear is not None:
            output = output + self.linear(standardised)
        return output


def _fitting_attribute(network: nn.Module) -> str:
    """Name of the MLP that maps the pooled descriptor to the output."""
    return "fitting" if isinstance(network, VectorCloudNet) else "head"


class AtomicEnergyModel(nn.Module):
    """E = sum_i E_i with E_i a cloud network of atom i's neighbours; forces by autograd.

    Args:
        network: a cloud network with a scalar output taking ``(pos, vec, scal, mask=...,
            weight=...)`` with no per-point vectors and one scalar (1/r): a
            :class:`~vcnn.network.VectorCloudNet` (``num_vectors=0, num_scalars=1``) or a
            :class:`~vcnn.network.BaselineNet` (raw relative coordinates: not rotation
            invariant).
        config: cutoff, pooling and energy offset (:class:`AtomicModelConfig`).
    """

    def __init__(self, network: nn.Module, config: AtomicModelConfig) -> None:
        super().__init__()
        if getattr(network, "output_kind", "scalar") != "scalar":
            raise ValueError("the per-atom energy network needs a scalar output")
        # the descriptor is standardised before the fitting net (see StandardisedInput)
        name = _fitting_attribute(network)
        fitting = getattr(network, name)
        if not isinstance(fitting, StandardisedInput):
            setattr(network, name, StandardisedInput(fitting, linear_term=config.linear_term))
        elif (fitting.linear is not None) != config.linear_term:
            raise ValueError(f"the network's fitting net {'has' if fitting.linear is not None
                             else 'lacks'} the linear term, the config says "
                             f"linear_term={config.linear_term}")
        self.network = network
        self.config = config

    @classmethod
    def vector_cloud(
        cls,
        config: AtomicModelConfig,
        *,
        dim: int = 3,
        embedding: Sequence[int] = (16, 32),
        axis_neurons: int = 4,
        fitting: Sequence[int] = (64, 64),
        activation: str = "silu",
    ) -> AtomicEnergyModel:
        """The symmetric model: a :class:`VectorCloudNet` of the distances and positions.

        SiLU keeps the energy smooth (C-infinity away from the cutoff switch).
        """
        network = VectorCloudNet(
            dim=dim,
            num_scalars=config.num_scalars,
            num_vectors=0,
            embedding=tuple(embedding),
            axis_neurons=axis_neurons,
            fitting=tuple(fitting),
            activation=activation,
            use_position_scalar_feature=True,
            use_angle_feature=False,
            position_vector="raw",
            scalar_channel=True,
            residual=True,
            pooling="mean",
        )
        return cls(network, config)

    @classmethod
    def baseline(
        cls,
        config: AtomicModelConfig,
        *,
        dim: int = 3,
        point_widths: Sequence[int] = (64, 64),
        head_widths: Sequence[int] = (64,),
        activation: str = "silu",
    ) -> AtomicEnergyModel:
        """The non-symmetric baseline: a :class:`BaselineNet` of the raw relative coordinates.

        Invariant to translation and permutation (relative positions, pooled), not to
        rotation or reflection.
        """
        network = BaselineNet(
            dim=dim,
            num_scalars=config.num_scalars,
            num_vectors=0,
            point_widths=tuple(point_widths),
            head_widths=tuple(head_widths),
            activation=activation,
        )
        return cls(network, config)

    def atomic_energies(self, positions: torch.Tensor, *, box: float | None) -> torch.Tensor:
        """Per-atom energies E_i.

        Args:
            positions: (B, N, d) float, in the parameters' dtype for exact results.
            box: edge of the periodic cubic box, or None for a free cluster.

        Returns:
            (B, N) float.
        """
        cfg = self.config
        clouds = neighbour_clouds(positions, cutoff=cfg.cutoff, inner=cfg.inner, box=box)
        batch, count, width, dim = clouds.relative.shape
        rows = batch * count
        # the atom itself first, at relative position 0 with the fixed weight self_weight
        relative = torch.cat(
            [clouds.relative.new_zeros(batch, count, 1, dim), clouds.relative], dim=2
        ).reshape(rows, width + 1, dim)
        if cfg.pooling_normaliser == "fixed":  # the cloud's weights add up to self_weight
            own = (cfg.self_weight - clouds.weight.sum(dim=2, keepdim=True)).clamp(min=0.0)
        else:
            own = clouds.weight.new_full((batch, count, 1), cfg.self_weight)
        weight = torch.cat([own, clouds.weight], dim=2).reshape(rows, width + 1)
        mask = torch.cat(
            [clouds.mask.new_ones(batch, count, 1), clouds.mask], dim=2
        ).reshape(rows, width + 1)
        scalars = torch.where(clouds.mask[..., None], cfg.point_scalars(clouds.distance), 0.0)
        scalars = torch.cat(
            [scalars.new_zeros(batch, count, 1, cfg.num_scalars), scalars], dim=2
        ).reshape(rows, width + 1, cfg.num_scalars)
        empty_vectors = relative.new_zeros(rows, width + 1, 0, dim)
        output = self.network(relative, empty_vectors, scalars, mask=mask, weight=weight)
        return (cfg.energy_offset + cfg.energy_scale * output).reshape(batch, count)

    @property
    def standardisation(self) -> StandardisedInput:
        """The fixed standardisation in front of the fitting net."""
        return getattr(self.network, _fitting_attribute(self.network))

    @torch.no_grad()
    def standardise_descriptor(
        self, positions: torch.Tensor, *, box: float | None, chunk: int = 8
    ) -> None:
        """Set the descriptor standardisation to zero mean, unit std over these atoms.

        Args:
            positions: (B, N, d) float, training configurations (a few are enough).
            box: edge of the periodic cubic box, or None.
            chunk: configurations per forward pass.
        """
        standardisation = self.standardisation
        standardisation.shift.zero_()
        standardisation.scale.fill_(1.0)
        captured: list[torch.Tensor] = []
        hook = standardisation.inner.register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0].detach())
        )
        try:
            dtype = standardisation.shift.dtype
            for part in positions.split(chunk):
                self(part.to(dtype), box=box)
        finally:
            hook.remove()
        descriptors = torch.cat(captured)
        standardisation.shift.copy_(descriptors.mean(dim=0))
        # a component constant over the data (e.g. a dead channel) keeps a unit scale
        spread = descriptors.std(dim=0)
        standardisation.scale.copy_(torch.where(spread > 1e-12, spread, torch.ones_like(spread)))

    def forward(self, positions: torch.Tensor, *, box: float | None) -> torch.Tensor:
        """Total energies: (B, N, d) positions -> (B,) float."""
        return self.atomic_energies(positions, box=box).sum(dim=1)

    def energy_and_forces(
        self, positions: torch.Tensor, *, box: float | None, create_graph: bool = False
    ) -> EnergyForces:
        """Energies and forces ``-dE/dx`` by autograd.

        Args:
            positions: (B, N, d) float.
            box: edge of the periodic cubic box, or None.
            create_graph: keep the graph of the forces (to train on them).

        Returns:
            :class:`EnergyForces` with energy (B,) and forces (B, N, d).
        """
        with torch.enable_grad():
            leaf = positions.detach().requires_grad_(True)
            energy = self(leaf, box=box)
            (gradient,) = torch.autograd.grad(
                energy.sum(), leaf, create_graph=create_graph
            )
        if not create_graph:
            energy = energy.detach()
        return EnergyForces(energy=energy, forces=-gradient)


def save_atomic_model(path: str | os.PathLike, model: AtomicEnergyModel, **extra: Any) -> Path:
    """Write ``model`` (network kind and config, settings, weights) atomically to ``path``.

    Args:
        path: target file.
        model: the model to save.
        **extra: JSON-like metadata stored with it (e.g. the training metrics).

    Returns:
        The path written.
    """
    kind = "vector_cloud" if isinstance(model.network, VectorCloudNet) else "baseline"
    payload = {
        "kind": CHECKPOINT_KIND,
        "network_kind": kind,
        "network": model.network.to_config(),
        "config": asdict(model.config),
        "state_dict": {key: value.cpu() for key, value in model.state_dict().items()},
        "extra": extra,
    }
    return atomic_write(path, lambda stream: torch.save(payload, stream))


def load_atomic_model(path: str | os.PathLike) -> AtomicEnergyModel:
    """Read a model written by :func:`save_atomic_model` (float64 parameters kept as saved).

    Raises:
        ValueError: when the file is not an atoms checkpoint.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not an atoms energy checkpoint (kind {CHECKPOINT_KIND!r})")
    network_type = VectorCloudNet if payload["network_kind"] == "vector_cloud" else BaselineNet
    network = network_type.from_config(payload["network"])
    model = AtomicEnergyModel(network, AtomicModelConfig(**payload["config"]))
    dtype = next(iter(payload["state_dict"].values())).dtype
    model.to(dtype).load_state_dict(payload["state_dict"])
    return model


__all__ = [
    "CHECKPOINT_KIND",
    "AtomicEnergyModel",
    "AtomicModelConfig",
    "EnergyForces",
    "NeighbourClouds",
    "StandardisedInput",
    "check_box",
    "load_atomic_model",
    "minimum_image_shift",
    "neighbour_clouds",
    "save_atomic_model",
    "smooth_cutoff",
]
