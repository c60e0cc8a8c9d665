"""The trained models shipped with the experiments load, are frame-independent and predict."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import channel_case
from vcnn.closure import load_closure
from vcnn.symmetry import check_frame_independence

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MODELS = {
    "published": (EXPERIMENTS / "published" / "model" / "best.pt", 0.0),
    "coupled": (EXPERIMENTS / "coupled" / "model" / "best.pt", 0.14),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_model_loads_weights_only_and_is_frame_independent(name):
    path, c_k = MODELS[name]
    raw = torch.load(path, weights_only=True)
    assert "optimizer_state" not in raw  # inference-only export
    closure = load_closure(path, device="cpu")
    # the physics of the training data: the published set-up (p = 1), C_k of the coupled data
    assert closure.physics["reaction_exponent"] == 1.0 and closure.physics["c_k"] == c_k
    assert closure.physics["production"] == "frozen" and closure.physics["dimension"] == 2
    model = closure.model
    assert model.is_factorised and model.pooling == "volume" and model.config.positive_output
    spec = closure.spec
    generator = torch.Generator().manual_seed(0)
    pos = torch.randn(8, 40, 2, generator=generator)
    vec = torch.randn(8, 40, spec.num_vectors, 2, generator=generator)
    scal = torch.randn(8, 40, spec.num_scalars, generator=generator)
    mask = torch.ones(8, 40, dtype=torch.bool)
    mask[:, 30:] = False
    report = check_frame_independence(model, pos, vec, scal, mask)
    assert report.passed(), report.to_markdown()
    assert closure.metadata["seed"] == 0 and closure.target_scale > 0
    tau = closure.predict(channel_case(1.0, nx=24, ny=10))
    assert np.isfinite(tau).all() and tau.min() >= 0
