"""Load a single-file (LDM / A1111 / ComfyUI) safetensors checkpoint as a pipeline, offline.

diffusers' ``from_single_file`` converts the LDM keys; it needs the model's
diffusers configuration (component configs, tokenizer), which comes from
``--config DIR`` (a local diffusers folder of the same model type, weights not
needed) or from the default config repository in the local Hugging Face cache.
Nothing is downloaded: ``local_files_only`` is always set. The pipeline class
(SD or SDXL) comes from the config folder's ``model_index.json`` or, without
one, from the checkpoint's keys (read from the header alone, no torch load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_surgery.errors import InputError

#: Key prefix only SDXL single files have (the second, OpenCLIP bigG text encoder).
_XL_KEY = "conditioner.embedders.1."
#: Key prefixes of a whole pipeline in one LDM file: the UNet, the VAE and a text encoder (SD 1.x/2.x or SDXL).
_UNET_KEY, _VAE_KEY, _TEXT_KEYS = "model.diffusion_model.", "first_stage_model.", ("cond_stage_model.", "conditioner.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_class_name(path: Path, config: Path | None) -> str:
    """``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` for this checkpoint (and config folder)."""
    if config is not None:
        index = config / "model_index.json"
        try:
            name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise InputError(f"--config {config}: no readable model_index.json; pass a diffusers pipeline folder "
                             "(configs and tokenizer; weights are not needed)") from None
        if name not in _CLASSES:
            raise InputError(f"--config {config}: pipeline class {name!r} is not supported; use an SD 1.x/2.x or SDXL config")
        return name
    from nemo_surgery.surgery.safetensors_file import read_header

    keys = read_header(path).tensors
    return _CLASSES[1] if any(k.startswith(_XL_KEY) for k in keys) else _CLASSES[0]


def is_pipeline_file(path: str | Path) -> bool:
    """True for a ``.safetensors`` LDM file that holds a whole pipeline: UNet, VAE and text encoder (header only).

    Such a file can be loaded for sampling (verify); a UNet-only file cannot.
    Unreadable or malformed files are False (whoever opens them reports why).
    """
    from nemo_surgery.errors import NemoError
    from nemo_surgery.surgery.safetensors_file import read_header

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        keys = read_header(path).tensors
    except (NemoError, OSError):
        return False
    return all(any(k.startswith(prefix) for k in keys) for prefix in (_UNET_KEY, _VAE_KEY, _TEXT_KEYS))


def check_single_file(path: Path, config: Path | None) -> None:
    """Refuse what from_single_file must not be given: pickles, non-safetensors files, a bad --config."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{path}: pickle checkpoints are refused (they can run code when loaded); "
                         "convert it to .safetensors first")
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path}: not a .safetensors file; --model takes a pipeline folder, a hub id or a single .safetensors file")
    if config is not None and not config.is_dir():
        raise InputError(f"--config {config}: not a folder; pass a local diffusers pipeline folder of this model type")


def load_single_file(path: Path, config: Path | None, torch_dtype: Any, with_vae: bool) -> Any:
    """Build the pipeline of a single-file checkpoint without network access; one-line InputError otherwise."""
    import diffusers

    check_single_file(path, config)
    cls_name = pipeline_class_name(path, config)
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "local_files_only": True}
    if config is not None:
        kwargs["config"] = str(config)
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if not with_vae:
        kwargs["vae"] = None
    try:
        return getattr(diffusers, cls_name).from_single_file(str(path), **kwargs)
    except InputError:
        raise
    except Exception as exc:  # diffusers raises ValueError, OSError, EnvironmentError, KeyError, hub errors
        first = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else type(exc).__name__
        if config is None:
            raise InputError(
                f"{path}: cannot load this single file offline ({first}); pass --config DIR, a local diffusers "
                "folder of this model type (configs and tokenizer), or put its default config in the local "
                "Hugging Face cache"
            ) from None
        raise InputError(f"{path}: could not load it with --config {config} ({first}); check that the config "
                         "folder is of the same model type (SD 1.x, 2.x or XL)") from None
