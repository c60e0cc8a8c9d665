import pytest

from vcnn.physics import Physics


def test_defaults_are_the_published_physics():
    physics = Physics()
    assert physics.reaction_exponent == 1.0
    assert (physics.diffusivity, physics.zeta, physics.gamma, physics.tau_p) == (0.1, 3.0, 200.0, 0.001)


def test_round_trip_and_case_meta():
    physics = Physics(reaction_exponent=0.5, production="coupled", c_k=0.02)
    assert Physics.from_dict(physics.to_dict()) == physics
    assert Physics.from_case_meta({"physics": physics.to_dict()}) == physics
    # case files written before the exponent existed used zeta sqrt(|tau|) tau
    old = Physics.from_case_meta({"D": 0.1, "zeta": 3.0, "gamma": 200.0, "tau_p": 0.001})
    assert old.reaction_exponent == 0.5


def test_differences_name_the_constants():
    assert Physics().differences(Physics(zeta=2.0)) == ["zeta: 3.0 vs 2.0"]
    assert Physics().differences(Physics(zeta=2.0), names=("diffusivity",)) == []


@pytest.mark.parametrize(
    "values", [{"diffusivity": 0.0}, {"zeta": -1.0}, {"production": "both"}, {"nu": float("nan")},
               {"reaction_exponent": "1"}, {"bogus": 1.0}]
)
def test_bad_constants_are_refused(values):
    with pytest.raises(ValueError):
        Physics.from_dict(values)
