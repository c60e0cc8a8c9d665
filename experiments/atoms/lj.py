"""Lennard-Jones atoms in reduced units: the exact potential, the lattice, the data set.

Reduced units: epsilon = sigma = mass = k_B = 1, time in sqrt(m sigma^2 / epsilon). The
potential is the shifted-force Lennard-Jones potential with cutoff r_c = 2.5,

    u(r) = 4 (r^-12 - r^-6),   u_sf(r) = u(r) - u(r_c) - (r - r_c) u'(r_c)   for r < r_c,

whose energy and force both vanish at r_c, so molecular dynamics conserves energy without the
jumps a truncated potential gives. Everything is float64 torch, vectorised over the batch and
all pairs (a few hundred atoms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from experiments.atoms.md import MDState, langevin_baoab
from vcnn.atoms import EnergyForces, minimum_image_shift

#: Cutoff of the shifted-force potential.
LJ_CUTOFF = 2.5
#: Number density of the liquid near the triple point (Verlet's classic state).
DENSITY = 0.8442


def _pair_energy(r: torch.Tensor) -> torch.Tensor:
    inverse6 = r**-6
    return 4.0 * (inverse6 * inverse6 - inverse6)


def _pair_derivative(r: torch.Tensor | float) -> torch.Tensor | float:
    return -48.0 * r**-13 + 24.0 * r**-7


def lj_energy_forces(
    positions: torch.Tensor, *, box: float | None, cutoff: float = LJ_CUTOFF
) -> EnergyForces:
    """Shifted-force Lennard-Jones energies and forces (analytic, not by autograd).

    Args:
        positions: (B, N, 3) float64.
        box: edge of the periodic cubic box (minimum image), or None for a free cluster.
        cutoff: r_c.

    Returns:
        :class:`vcnn.atoms.EnergyForces`: energy (B,) and forces (B, N, 3), float64.
    """
    difference = positions[:, None, :, :] - positions[:, :, None, :]  # x_j - x_i: (B, i, j, 3)
    difference = difference + minimum_image_shift(difference, box)
    squared = (difference * difference).sum(-1)
    count = positions.shape[1]
    itself = torch.eye(count, dtype=torch.bool, device=positions.device)
    within = (squared < cutoff * cutoff) & ~itself
    r = torch.where(within, squared, torch.ones_like(squared)).sqrt()
    shift_energy = float(_pair_energy(torch.tensor(cutoff, dtype=torch.float64)))
    slope = float(_pair_derivative(cutoff))
    pair = torch.where(within, _pair_energy(r) - shift_energy - (r - cutoff) * slope, 0.0)
    energy = 0.5 * pair.sum(dim=(1, 2))
    # force on i from j: -u_sf'(r) (x_i - x_j) / r = u_sf'(r) (x_j - x_i) / r
    derivative = torch.where(within, (_pair_derivative(r) - slope) / r, 0.0)
    forces = (derivative[..., None] * difference).sum(dim=2)
    return EnergyForces(energy=energy, forces=forces)


def closest_approach(positions: torch.Tensor, *, box: float | None, chunk: int = 64) -> torch.Tensor:
    """The shortest pair distance of each configuration (minimum image).

    Args:
        positions: (B, N, d) float.
        box: edge of the periodic cubic box, or None for a free cluster.
        chunk: configurations per batch of the all-pairs distances.

    Returns:
        (B,) float64; ``inf`` for a configuration of fewer than two atoms.
    """
    closest = []
    for part in positions.double().split(chunk):
        difference = part[:, None, :, :] - part[:, :, None, :]
        distance = (difference + minimum_image_shift(difference, box)).norm(dim=-1)
        itself = torch.eye(part.shape[1], dtype=torch.bool)
        closest.append(distance.masked_fill(itself, float("inf")).flatten(1).amin(dim=1))
    return torch.cat(closest) if closest else positions.new_zeros(0, dtype=torch.float64)


def fcc_lattice(cells: int, *, density: float = DENSITY) -> tuple[torch.Tensor, float]:
    """An fcc crystal of 4 cells^3 atoms filling a cubic box at ``density``.

    Returns:
        positions (4 cells^3, 3) float64 and the box edge.
    """
    box = (4 * cells**3 / density) ** (1.0 / 3.0)
    spacing = box / cells
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.stack(np.meshgrid(*[np.arange(cells)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    positions = ((grid + basis[None]) * spacing).reshape(-1, 3) + 0.25 * spacing
    return torch.as_tensor(positions, dtype=torch.float64), float(box)


@dataclass(frozen=True)
class AtomsData:
    """Configurations with their exact energies and forces.

    Attributes:
        positions: (M, N, 3) float64.
        energy: (M,) float64 total potential energy.
        forces: (M, N, 3) float64.
        temperature: (M,) float64, the thermostat temperature each was sampled at.
        perturbed: (M,) bool, whether random displacements were added after sampling.
        box: edge of the periodic cubic box.
    """

    positions: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    temperature: torch.Tensor
    perturbed: torch.Tensor
    box: float

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def subset(self, index: torch.Tensor | np.ndarray | slice) -> AtomsData:
        """The configurations ``index`` (an index array, bool mask or slice)."""
        index = torch.as_tensor(index) if not isinstance(index, slice) else index
        return AtomsData(
            positions=self.positions[index],
            energy=self.energy[index],
            forces=self.forces[index],
            temperature=self.temperature[index],
            perturbed=self.perturbed[index],
            box=self.box,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (for ``np.savez``)."""
        return {
            "positions": self.positions.numpy(),
            "energy": self.energy.numpy(),
            "forces": self.forces.numpy(),
            "temperature": self.temperature.numpy(),
            "perturbed": self.perturbed.numpy(),
            "box": np.array(self.box),
        }


@dataclass(frozen=True)
class GenerationSettings:
    """How the data set is sampled.

    Attributes:
        temperatures: thermostat temperatures, one replica each (run side by side).
        samples_per_temperature: configurations kept per temperature.
        cells: fcc cells per edge (4 cells^3 atoms).
        equilibration_steps: Langevin steps before the first sample.
        steps_between_samples: Langevin steps between two samples.
        dt: time step.
        friction: Langevin friction (1 / time).
        perturbed_fraction: share of the samples that get random displacements.
        perturbation: standard deviation of those displacements (sigma units).
        seed: random seed.
    """

    temperatures: tuple[float, ...] = (0.8, 1.1, 1.4)
    samples_per_temperature: int = 200
    cells: int = 3
    equilibration_steps: int = 2000
    steps_between_samples: int = 40
    dt: float = 0.005
    friction: float = 1.0
    perturbed_fraction: float = 0.25
    perturbation: float = 0.03
    seed: int = 0


def generate(settings: GenerationSettings) -> tuple[AtomsData, MDState]:
    """Sample LJ configurations by Langevin dynamics from an fcc start; label them exactly.

    One replica per temperature, all integrated together. A share of the samples gets random
    Gaussian displacements (off-equilibrium configurations widen the training distribution).

    Returns:
        The data (ordered by sample, then temperature) and the replicas' final state
        (positions and velocities (T, N, 3) float64, to start an NVE run at a sampled state).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    lattice, box = fcc_lattice(settings.cells)
    replicas = len(settings.temperatures)
    temperature = torch.tensor(settings.temperatures, dtype=torch.float64)
    positions = lattice.expand(replicas, -1, -1).clone()
    velocities = torch.randn(positions.shape, generator=generator, dtype=torch.float64)
    velocities = velocities * temperature.sqrt()[:, None, None]
    velocities = velocities - velocities.mean(dim=1, keepdim=True)

    def force(x: torch.Tensor) -> EnergyForces:
        return lj_energy_forces(x, box=box)

    def advance(x: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = langevin_baoab(
            force, x, v, temperature=temperature, friction=settings.friction, dt=settings.dt,
            steps=steps, generator=generator,
        )
        return state.positions, state.velocities

    positions, velocities = advance(positions, velocities, settings.equilibration_steps)
    frames = []
    for _ in range(settings.samples_per_temperature):
        positions, velocities = advance(positions, velocities, settings.steps_between_samples)
        frames.append(positions)
    sampled = torch.stack(frames).reshape(-1, *lattice.shape)  # (S * T, N, 3)
    count = sampled.shape[0]
    perturbed = torch.rand(count, generator=generator, dtype=torch.float64)
    perturbed = perturbed < settings.perturbed_fraction
    noise = torch.randn(sampled.shape, generator=generator, dtype=torch.float64)
    sampled = sampled + settings.perturbation * noise * perturbed[:, None, None]
    sampled = torch.remainder(sampled, box)
    labels = [lj_energy_forces(chunk, box=box) for chunk in sampled.split(64)]
    data = AtomsData(
        positions=sampled,
        energy=torch.cat([label.energy for label in labels]),
        forces=torch.cat([label.forces for label in labels]),
        temperature=temperature.repeat(settings.samples_per_temperature),
        perturbed=perturbed,
        box=box,
    )
    return data, MDState(positions=positions, velocities=velocities)


__all__ = [
    "DENSITY",
    "LJ_CUTOFF",
    "AtomsData",
    "GenerationSettings",
    "fcc_lattice",
    "generate",
    "lj_energy_forces",
]
