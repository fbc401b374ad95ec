"""Experiment grids shipped with FedDiffuse (TOML files; see feddiffuse.shared.experiment)."""
