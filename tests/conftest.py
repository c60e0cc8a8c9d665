"""Session fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="session")
def coarse_3d_model(tmp_path_factory):
    """The coarse 3-D hill family and a tiny closure trained on it (``tests/hills3d_model.py``).

    Shared by ``tests/test_train3d.py`` and ``tests/test_simulate3d.py``: built once a session.
    """
    from mpi4py import MPI  # noqa: F401  (initialise MPI before dolfinx)

    from tests.hills3d_model import build

    return build(tmp_path_factory.mktemp("coarse_3d_model"))
