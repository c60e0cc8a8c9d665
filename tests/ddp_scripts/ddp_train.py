"""Data-parallel training on the CPU (gloo), launched by ``torchrun --nproc-per-node 2``.

Usage: torchrun --nproc-per-node 2 -m tests.ddp_scripts.ddp_train DATA_DIR OUT_DIR

Every rank saves its final parameters (and the backend of its training pass) to
OUT_DIR/params_rank{RANK}.pt so that the test can check that the ranks ended identical.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from vcnn.training import TrainConfig, train


def main() -> None:
    data_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    config = TrainConfig.from_dict(
        {
            "data": data_dir,
            "out": str(out_dir / "run"),
            "validation_alphas": [1.25],
            "epochs": 2,
            "batch_size": 32,
            "cloud_size": 24,
            "learning_rate": 3e-3,
            "scheduler": "cosine",
            "seed": 7,
            "device": "cpu",
            "num_threads": 1,
            "model": {"embedding": [8, 16], "fitting": [32], "axis_neurons": 4},
        }
    )
    result = train(config)
    rank = int(os.environ["RANK"])
    state = {key: value.detach().cpu() for key, value in result.model.state_dict().items()}
    torch.save(
        {"state": state, "history": [r.train_loss for r in result.history], "engine": result.engine},
        out_dir / f"params_rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
