"""Vector-cloud neural networks for learned nonlocal closures.

Pure numpy/scipy/torch: nothing here imports dolfinx, gmsh or ``solvers`` at module level, so
training and inference run on a machine that has only torch.
"""

__version__ = "0.1.0"
