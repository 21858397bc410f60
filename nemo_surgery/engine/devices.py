"""Option vocabularies shared by the CLI and the library (no heavy imports here)."""

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
