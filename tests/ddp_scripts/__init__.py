"""Helper scripts and synthetic data for the training tests (launched by torchrun, imported)."""
