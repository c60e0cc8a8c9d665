"""Molecular dynamics (unit masses, float64 torch, batched over replicas) and its analysis.

* :func:`langevin_baoab`: Langevin dynamics (BAOAB splitting, Leimkuhler & Matthews), the
  thermostat of the data generation;
* :func:`velocity_verlet`: NVE dynamics, recording the energies (drift) and frames (RDF);
* :func:`energy_drift`: the drift of the total energy per atom over a run (a straight-line fit);
* :func:`radial_distribution`: g(r) of frames in a periodic cubic box.

A force field is a callable ``positions (B, N, 3) -> vcnn.atoms.EnergyForces`` (energy (B,),
forces (B, N, 3)): the exact Lennard-Jones potential or a learned model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vcnn.atoms import EnergyForces, minimum_image_shift

ForceField = Callable[[torch.Tensor], EnergyForces]


@dataclass(frozen=True)
class MDState:
    """Where a run ended.

    Attributes:
        positions: (B, N, 3) float64 (not wrapped into the box: the force fields use the
            minimum image of differences, so unwrapped positions are fine).
        velocities: (B, N, 3) float64.
    """

    positions: torch.Tensor
    velocities: torch.Tensor


def langevin_baoab(
    force_field: ForceField,
    positions: torch.Tensor,
    velocities: torch.Tensor,
    *,
    temperature: torch.Tensor,
    friction: float,
    dt: float,
    steps: int,
    generator: torch.Generator,
) -> MDState:
    """Langevin dynamics by the BAOAB splitting (exact Ornstein-Uhlenbeck velocity step).

    Args:
        force_field: positions (B, N, 3) -> EnergyForces.
        positions: (B, N, 3) float64.
        velocities: (B, N, 3) float64.
        temperature: (B,) float64, the target temperature of each replica.
        friction: gamma (1 / time).
        dt: time step.
        steps: number of steps.
        generator: torch random generator (reproducible noise).

    Returns:
        The final :class:`MDState`.
    """
    decay = math.exp(-friction * dt)
    kick = math.sqrt(1.0 - decay * decay) * temperature.sqrt()[:, None, None]
    forces = force_field(positions).forces
    for _ in range(steps):
        velocities = velocities + 0.5 * dt * forces
        positions = positions + 0.5 * dt * velocities
        noise = torch.randn(velocities.shape, generator=generator, dtype=velocities.dtype)
        velocities = decay * velocities + kick * noise
        positions = positions + 0.5 * dt * velocities
        forces = force_field(positions).forces
        velocities = velocities + 0.5 * dt * forces
    return MDState(positions=positions, velocities=velocities)


@dataclass(frozen=True)
class Trajectory:
    """An NVE run.

    Attributes:
        time: (R,) float64, the recorded times.
        potential: (R, B) float64, the potential energy at those times.
        kinetic: (R, B) float64, the kinetic energy.
        frames: (F, B, N, 3) float64, positions every ``frame_every`` steps.
        final: the last state.
    """

    time: np.ndarray
    potential: np.ndarray
    kinetic: np.ndarray
    frames: np.ndarray
    final: MDState

    @property
    def total(self) -> np.ndarray:
        """(R, B) float64, the total energy."""
        return self.potential + self.kinetic


def velocity_verlet(
    force_field: ForceField,
    positions: torch.Tensor,
    velocities: torch.Tensor,
    *,
    dt: float,
    steps: int,
    record_every: int = 10,
    frame_every: int = 100,
) -> Trajectory:
    """NVE dynamics by velocity Verlet (unit masses).

    Args:
        force_field: positions (B, N, 3) -> EnergyForces.
        positions: (B, N, 3) float64.
        velocities: (B, N, 3) float64.
        dt: time step.
        steps: number of steps.
        record_every: record the energies every this many steps (and at step 0).
        frame_every: keep the positions every this many steps (for the RDF).

    Returns:
        A :class:`Trajectory`.
    """
    fields = force_field(positions)
    forces = fields.forces
    time, potential, kinetic, frames = [], [], [], []

    def record(step: int, energy: torch.Tensor) -> None:
        time.append(step * dt)
        potential.append(energy.detach().numpy().copy())
        kinetic.append(0.5 * (velocities * velocities).sum(dim=(1, 2)).numpy().copy())

    record(0, fields.energy)
    for step in range(1, steps + 1):
        velocities = velocities + 0.5 * dt * forces
        positions = positions + dt * velocities
        fields = force_field(positions)
        forces = fields.forces
        velocities = velocities + 0.5 * dt * forces
        if step % record_every == 0:
            record(step, fields.energy)
        if step % frame_every == 0:
            frames.append(positions.detach().numpy().copy())
    return Trajectory(
        time=np.asarray(time),
        potential=np.stack(potential),
        kinetic=np.stack(kinetic),
        frames=np.stack(frames) if frames else np.zeros((0, *positions.shape)),
        final=MDState(positions=positions, velocities=velocities),
    )


def energy_drift(time: np.ndarray, total: np.ndarray, atoms: int) -> float:
    """Drift of the total energy per atom over a run: |slope of a line fit| x duration.

    A fit, not the end-to-end difference, so that the bounded fluctuation of a symplectic
    integrator does not count as drift.

    Args:
        time: (R,) float64.
        total: (R,) float64 total energy of one replica.
        atoms: number of atoms.

    Returns:
        The drift in energy units per atom (>= 0).
    """
    slope = np.polyfit(time, total / atoms, 1)[0]
    return float(abs(slope) * (time[-1] - time[0]))


def radial_distribution(
    frames: np.ndarray, *, box: float, bins: int = 100, r_max: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The radial distribution function g(r) in a periodic cubic box.

    Args:
        frames: (F, N, 3) float64 positions.
        box: box edge.
        bins: number of histogram bins.
        r_max: largest distance (at most half the box edge; default that).

    Returns:
        Bin centres (bins,) and g (bins,), float64.
    """
    r_max = box / 2 if r_max is None else min(r_max, box / 2)
    positions = torch.as_tensor(frames, dtype=torch.float64)
    count = positions.shape[1]
    difference = positions[:, None, :, :] - positions[:, :, None, :]
    difference = difference + minimum_image_shift(difference, box)
    distance = torch.linalg.vector_norm(difference, dim=-1)
    upper = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
    pairs = distance[:, upper].numpy().ravel()
    histogram, edges = np.histogram(pairs, bins=bins, range=(0.0, r_max))
    centres = 0.5 * (edges[1:] + edges[:-1])
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    density = count / box**3
    # each pair counted once: the expected count per shell is N/2 rho shell for an ideal gas
    ideal = 0.5 * count * density * shell * positions.shape[0]
    return centres, histogram / ideal


__all__ = [
    "ForceField",
    "MDState",
    "Trajectory",
    "energy_drift",
    "langevin_baoab",
    "radial_distribution",
    "velocity_verlet",
]
