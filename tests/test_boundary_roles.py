"""Boundary roles of a user mesh: every boundary group needs one; ``natural`` is explicit."""

from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

import pytest

from meshes.channel import CHANNEL_BOUNDARIES, channel_with_cylinder_msh
from meshes.io import read_mesh
from solvers.generate import BOUNDARY_ROLES, GenerateConfig, boundary_spec
from solvers.simulate import SimulateConfig
from vcnn.config import ConfigError

INLET = {"inlet": {"profile": "parabolic", "mean_velocity": 1.0}}


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    path = channel_with_cylinder_msh(tmp_path_factory.mktemp("mesh") / "channel.msh", size=0.2)
    return path, read_mesh(path)


def _config(path, boundaries, cls=GenerateConfig):
    return cls.from_dict({"mesh": {"kind": "file", "file": str(path)}, "boundaries": boundaries,
                          **({"closure": "pde"} if cls is SimulateConfig else {})})


def test_natural_boundaries_get_an_outlets_conditions(channel):
    path, tagged = channel
    as_outlet = boundary_spec(
        _config(path, {"walls": ["walls", "cylinder"], "outlets": ["outlet"], "inlets": INLET}),
        tagged)
    as_natural = boundary_spec(
        _config(path, {"walls": ["walls", "cylinder"], "natural": ["outlet"], "inlets": INLET}),
        tagged)
    assert as_natural.outlets == as_outlet.outlets == (CHANNEL_BOUNDARIES["outlet"],)
    assert as_natural.walls == as_outlet.walls
    assert list(as_natural.inlets) == list(as_outlet.inlets) == [CHANNEL_BOUNDARIES["inlet"]]
    assert "natural" in BOUNDARY_ROLES


@pytest.mark.parametrize("cls, table", [(GenerateConfig, "generate"), (SimulateConfig, "simulate")])
def test_a_boundary_group_without_a_role_is_refused_by_name(channel, cls, table):
    path, tagged = channel
    config = _config(path, {"walls": ["walls"], "inlets": INLET}, cls)
    with pytest.raises(ConfigError) as error:
        boundary_spec(config, tagged)
    message = str(error.value)
    assert f"boundary 'cylinder' of mesh file {str(path)!r} has no role in [{table}." in message
    assert "(nor have ['outlet'])" in message
    for role in BOUNDARY_ROLES:
        assert role in message


def test_a_boundary_with_two_roles_is_refused(channel):
    path, tagged = channel
    config = _config(path, {"walls": ["walls", "cylinder"], "outlets": ["outlet"],
                            "natural": ["outlet"], "inlets": INLET})
    with pytest.raises(ConfigError, match=r"boundary 'outlet' has more than one role"):
        boundary_spec(config, tagged)
