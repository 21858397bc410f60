"""Whether verification can sample a checkpoint, decided from files and headers alone (no torch import)."""

from __future__ import annotations

from pathlib import Path


def loadable_pipeline(path: str | Path) -> bool:
    """True for a diffusers pipeline folder verification can load (model_index.json + parts)."""
    path = Path(path)
    return (path / "model_index.json").is_file() and all(
        (path / part).is_dir() for part in ("unet", "text_encoder", "tokenizer", "vae")
    )


def loadable(path: str | Path) -> bool:
    """True for what verification can sample: a pipeline folder, or a single .safetensors file of a whole pipeline."""
    from nemo_surgery.engine.single_file import is_pipeline_file

    return loadable_pipeline(path) or is_pipeline_file(path)
