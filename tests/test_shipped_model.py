"""The trained model shipped with experiment (a) loads, is frame-independent and predicts."""

from pathlib import Path

import numpy as np
import torch

from vcnn.checkpoint import load_model
from vcnn.features import FeatureSpec
from vcnn.symmetry import check_frame_independence

MODEL = Path(__file__).resolve().parents[1] / "experiments" / "published" / "model" / "best.pt"


def test_shipped_model_loads_weights_only_and_is_frame_independent():
    raw = torch.load(MODEL, weights_only=True)
    assert "optimizer_state" not in raw  # inference-only export
    loaded = load_model(MODEL)
    spec = FeatureSpec.from_dict(loaded.metadata["feature_spec"])
    generator = torch.Generator().manual_seed(0)
    pos = torch.randn(8, 40, 2, generator=generator)
    vec = torch.randn(8, 40, spec.num_vectors, 2, generator=generator)
    scal = torch.randn(8, 40, spec.num_scalars, generator=generator)
    mask = torch.ones(8, 40, dtype=torch.bool)
    mask[:, 30:] = False
    report = check_frame_independence(loaded.model, pos, vec, scal, mask)
    assert report.passed(), report.to_markdown()
    assert loaded.metadata["seed"] == 0 and loaded.target_scale > 0
    assert np.isfinite(loaded.model(pos, vec, scal, mask).detach().numpy()).all()
