"""The built-in demo: synthetic data, a tiny model and the end-to-end run."""
