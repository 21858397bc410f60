"""Training, evaluation and shipping of the embedded demo model (run from the repository root: python -m tools.demo_model.train)."""
