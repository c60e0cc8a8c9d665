"""The training pass as a module: what DistributedDataParallel wraps."""

from __future__ import annotations

import torch
from torch import nn

from vcnn.engines.base import ROWS, PassData
from vcnn.engines.registry import bind
from vcnn.features import FeatureNormalizer, FieldTable

__all__ = ["TrainingPass"]


class TrainingPass(nn.Module):
    """A network bound to a data set's training-rows forward by the backend that runs it.

    Built once per data set (a C kernel is compiled or found then); its forward takes a row
    batch and returns the predictions, differentiable in the network's parameters, so that
    ``DistributedDataParallel(TrainingPass(...))`` trains with the fast backend too.

    Args:
        model: the network (a submodule: its parameters are this module's).
        table: the data set's per-point tensors.
        normalizer: the net's input normaliser, fixed while the pass is used.
        engine: ``"auto"`` or a backend's name (:func:`vcnn.engines.registry.bind`).

    Attributes:
        model: the network.
        engine: the name of the backend that runs (``"fused"``, ``"sparse"``, ``"padded"``).
    """

    def __init__(
        self,
        model: nn.Module,
        table: FieldTable,
        normalizer: FeatureNormalizer | None,
        *,
        engine: str = "auto",
    ) -> None:
        super().__init__()
        self.model = model
        self._rows = bind(ROWS, model, PassData(table, normalizer), engine=engine)
        self.engine: str = self._rows.engine

    def forward(self, queries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The network on B clouds given as table rows.

        Args:
            queries: (B,) int64 rows of the query points.
            indices: (B, n) int rows of the cloud points, -1 in padding slots.

        Returns:
            (B,) (or (B, d), (B, d, d)) network output, differentiable in the parameters.
        """
        return self._rows(self.model, queries, indices)
