"""nemo-surgery: localize and remove memorization neurons in Stable Diffusion (NeMo)."""

__version__ = "0.1.0"
