import json

import numpy as np
import pytest

from vcnn.casefile import Case, CaseFileError, case_paths, read_case, write_case


def make_case(n=50, d=2, seed=0):
    rng = np.random.default_rng(seed)
    return Case(
        points=rng.random((n, d)),
        velocity=rng.normal(size=(n, d)),
        tau=rng.random(n),
        strain_rate=rng.random(n),
        wall_distance=rng.random(n),
        nodal_volume=rng.random(n) + 0.1,
        is_wall=rng.random(n) < 0.1,
        period=np.array([9.0] + [0.0] * (d - 1)),
        meta={"alpha": 1.0, "seed": seed},
        name="hill_a1.000",
    )


def test_round_trip(tmp_path):
    case = make_case()
    case.extra["pressure"] = np.arange(50.0)
    path = write_case(tmp_path / "hill_a1.000.npz", case)
    back = read_case(path)
    for key in ("points", "velocity", "tau", "strain_rate", "wall_distance", "nodal_volume"):
        np.testing.assert_array_equal(getattr(back, key), getattr(case, key))
    np.testing.assert_array_equal(back.is_wall, case.is_wall)
    assert back.meta == {"alpha": 1.0, "seed": 0}
    assert back.name == "hill_a1.000"
    np.testing.assert_array_equal(back.extra["pressure"], np.arange(50.0))
    assert back.tau_integral() == pytest.approx(float(case.nodal_volume @ case.tau))
    # the file holds exactly the documented keys, meta as a JSON string
    with np.load(path) as data:
        assert json.loads(str(data["meta"]))["alpha"] == 1.0
        assert data["is_wall"].dtype == bool


def test_atomic_write_leaves_no_temporaries(tmp_path):
    write_case(tmp_path / "a.npz", make_case())
    write_case(tmp_path / "a.npz", make_case(seed=1))  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]
    assert read_case(tmp_path / "a.npz").meta["seed"] == 1
    assert case_paths(tmp_path) == [tmp_path / "a.npz"]


def test_failed_write_keeps_old_file(tmp_path):
    write_case(tmp_path / "a.npz", make_case())
    bad = make_case(seed=2)
    bad.meta["unserialisable"] = object()
    with pytest.raises(TypeError):
        write_case(tmp_path / "a.npz", bad)
    assert read_case(tmp_path / "a.npz").meta["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c, "velocity", c.velocity[:, :1]), "velocity"),
        (lambda c: c.tau.__setitem__(3, np.nan), "NaN"),
        (lambda c: c.velocity.__setitem__((0, 0), np.inf), "velocity"),
        (lambda c: setattr(c, "period", np.zeros(3)), "period"),
        (lambda c: setattr(c, "points", np.zeros((0, 2))), "no points"),
        (lambda c: c.nodal_volume.__setitem__(0, 0.0), "nodal_volume"),
    ],
)
def test_invalid_cases_are_rejected(mutate, message):
    case = make_case()
    with pytest.raises(CaseFileError, match=message):
        mutate(case)
        from vcnn.casefile import validate_case

        validate_case(case)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(CaseFileError, match="does not exist"):
        read_case(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(CaseFileError, match="corrupt"):
        read_case(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, points=np.zeros((3, 2)))
    with pytest.raises(CaseFileError, match="lacks keys"):
        read_case(partial)
    truncated = tmp_path / "truncated.npz"
    write_case(truncated, make_case())
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CaseFileError):
        read_case(truncated)


def test_messages_name_the_file_and_the_problem(tmp_path):
    from vcnn.casefile import inspect_case

    text = tmp_path / "notes.npz"
    text.write_text("just some text\n")
    with pytest.raises(CaseFileError, match=r"notes\.npz.*not an \.npz archive"):
        read_case(text)
    with pytest.raises(CaseFileError, match=r"notes\.npz.*not an \.npz archive"):
        inspect_case(text)
    # a contract violation found while reading names the file
    good = write_case(tmp_path / "good.npz", make_case())
    with np.load(good) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["velocity"] = arrays["velocity"][:, :1]
    np.savez(tmp_path / "bad_shape.npz", **arrays)
    with pytest.raises(CaseFileError, match=r"bad_shape\.npz.*velocity must have shape"):
        read_case(tmp_path / "bad_shape.npz")
    assert inspect_case(good).num_points == 50 and inspect_case(good).dim == 2
    with pytest.raises(CaseFileError, match="is a file"):
        case_paths(good)


def test_a_case_needs_more_than_a_few_points():
    with pytest.raises(CaseFileError, match="only 3 points"):
        make_case(n=3)
