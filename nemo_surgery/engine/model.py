"""Load a Stable Diffusion pipeline for scanning, encode prompts, fingerprint the model."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from nemo_surgery.engine.devices import DEVICES, DTYPE_NAMES
from nemo_surgery.engine.layers import ValueLayer, discover_value_layers
from nemo_surgery.errors import InputError

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


def resolve_device(name: str) -> torch.device:
    """Map --device (auto/cpu/cuda/mps, or e.g. cuda:1) to a torch device that exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: MPS is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: unknown device; use one of {', '.join(DEVICES)}") from None


def resolve_dtype(name: str) -> torch.dtype:
    """Map --dtype (fp32/fp16/bf16) to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}") from None


@dataclass
class Conditioning:
    """Text conditioning for a batch of prompts, ready for the UNet."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None
    truncated: list[bool] = field(default_factory=list)

    def repeat(self, n: int) -> Conditioning:
        """Repeat a one-prompt conditioning n times along the batch."""
        added = {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()} if self.added else None
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]), added, self.truncated * n)

    def select(self, index: torch.Tensor) -> Conditioning:
        """Pick (and possibly repeat) prompts by batch index."""
        added = {k: v[index] for k, v in self.added.items()} if self.added else None
        truncated = [self.truncated[i] for i in index.tolist()] if self.truncated else []
        return Conditioning(self.hidden[index], added, truncated)

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``unet(latents, t, **kwargs)``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


@dataclass
class LoadedModel:
    """A loaded pipeline plus what scanning needs to know about it."""

    pipe: Any
    source: str
    device: torch.device
    dtype: torch.dtype
    #: UNet forward calls made on this model so far (counted by a pre-hook; shown by progress bars).
    unet_calls: int = field(default=0, init=False)

    #: UNet forward calls over every model loaded in this process.
    all_unet_calls: ClassVar[int] = 0

    def __post_init__(self) -> None:
        unet = getattr(self.pipe, "unet", None)
        if unet is not None:
            unet.register_forward_pre_hook(self._count_call)

    def _count_call(self, _module: Any, _args: Any) -> None:
        self.unet_calls += 1
        LoadedModel.all_unet_calls += 1

    @property
    def unet(self) -> torch.nn.Module:
        """The denoising UNet."""
        return self.pipe.unet

    @property
    def is_xl(self) -> bool:
        """True for SDXL-style pipelines (two text encoders, added conditioning)."""
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @cached_property
    def layers(self) -> list[ValueLayer]:
        """Every cross-attention value layer, in forward order."""
        found = discover_value_layers(self.unet)
        if not found:
            raise InputError(f"{self.source}: the UNet has no cross-attention value layers (attn2.to_v)")
        return found

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's latent at its configured sample size."""
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``epsilon`` (SD 1.x, SDXL), ``v_prediction`` (SD 2.x 768-v) or ``sample``."""
        return str(getattr(self.pipe.scheduler.config, "prediction_type", None) or "epsilon")

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule's cumulative alphas (CPU float32), from the pipeline's scheduler."""
        from diffusers import DDIMScheduler

        with _quiet_diffusers():
            return DDIMScheduler.from_config(self.pipe.scheduler.config).alphas_cumprod.float().cpu()

    def epsilon(self, output: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """The noise prediction for a UNet ``output`` on ``sample`` at ``timestep`` (see engine/prediction.py)."""
        from nemo_surgery.engine.prediction import to_epsilon

        return to_epsilon(output, sample, timestep, self.alphas_cumprod, self.prediction_type)

    @property
    def max_tokens(self) -> int:
        """The tokenizer's sequence length (77 for CLIP)."""
        return int(self.pipe.tokenizer.model_max_length)

    def token_count(self, prompt: str) -> int:
        """Number of tokens of a prompt including start/end tokens, before truncation."""
        with _quiet_diffusers():
            return len(self.pipe.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts into UNet conditioning (truncating to the tokenizer limit)."""
        truncated = [self.token_count(p) > self.max_tokens for p in prompts]
        if self.is_xl:
            return self._encode_xl(prompts, truncated)
        tok = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        encoder = self.pipe.text_encoder
        mask = tok.attention_mask.to(self.device) if getattr(encoder.config, "use_attention_mask", False) else None
        hidden = encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return Conditioning(hidden.to(self.dtype), None, truncated)

    def _encode_xl(self, prompts: list[str], truncated: list[bool]) -> Conditioning:
        with _quiet_diffusers():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        _, h, w = self.latent_shape
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        size = (h * scale, w * scale)
        time_ids = torch.tensor([list(size) + [0, 0] + list(size)], device=self.device, dtype=self.dtype)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.expand(len(prompts), -1)}
        return Conditioning(embeds.to(self.dtype), added, truncated)

    @cached_property
    def weights_fingerprint(self) -> str | None:
        """Byte-level fingerprint of the stored weights (surgery.fingerprint, no config); apply checks it."""
        return _weights_fingerprint(self)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the UNet config and the stored value, conv_in and conv_out weights.

        The weights are read as stored in the UNet's safetensors files, so the
        fingerprint does not depend on --dtype or --device; statistics and
        neuron sets carry it so that they are never used on another model.
        Models that did not come from safetensors files hash their weights as
        loaded.
        """
        cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        keys = [f"{layer.id}.weight" for layer in self.layers] + ["conv_in.weight", "conv_out.weight"]
        folder = Path(str(getattr(self.unet.config, "_name_or_path", "") or ""))
        tensors = _stored_tensors(folder, keys) if folder.is_dir() else None
        if tensors is None:
            modules = dict(self.unet.named_parameters())
            tensors = {key: modules[key].detach().cpu() for key in keys}
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
        for key in keys:
            tensor = tensors[key].contiguous()
            h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _weights_fingerprint(model: LoadedModel) -> str | None:
    """surgery.fingerprint of the single file or UNet folder the model was loaded from; None if not local safetensors."""
    from nemo_surgery.errors import NemoError
    from nemo_surgery.surgery.fingerprint import weights_fingerprint

    source = Path(model.source).expanduser()
    name = str(getattr(model.unet.config, "_name_or_path", "") or "")
    where = source if source.is_file() else (Path(name) if name else None)
    if where is None or not where.is_dir() and not where.is_file():
        return None
    try:
        return weights_fingerprint(where)
    except NemoError:
        return None


def _stored_tensors(unet_dir: Path, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """Read tensors as stored in the UNet folder's default (non-variant) safetensors weights."""
    from safetensors import safe_open

    from nemo_surgery.surgery.discover import weight_groups

    try:
        groups = weight_groups(unet_dir)
    except InputError:
        return None
    default = [g for g in groups if g.label.startswith("diffusion_pytorch_model.safetensors")]
    group = (default or groups)[0]
    out: dict[str, torch.Tensor] = {}
    for path in group.files:
        with safe_open(str(path), framework="pt") as fh:
            for key in set(keys) & set(fh.keys()):
                out[key] = fh.get_tensor(key)
    return out if len(out) == len(keys) else None


class _quiet_diffusers:
    """Silence diffusers/transformers logging, warnings and progress bars inside the block."""

    def __enter__(self) -> None:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        self._mods = (dlog, tlog)
        self._levels = [m.get_verbosity() for m in self._mods]
        for m in self._mods:
            m.set_verbosity_error()
            m.disable_progress_bar()
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        for m, level in zip(self._mods, self._levels):
            m.set_verbosity(level)
            m.enable_progress_bar()
        self._warn.__exit__(*exc)


def _check_local_pipeline(path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"{path}: not a folder; --model takes a diffusers pipeline folder or a hub id")
    if not (path / "model_index.json").is_file():
        hint = " (this looks like a UNet folder; pass the pipeline folder above it)" if (path / "config.json").is_file() else ""
        raise InputError(f"{path}: not a diffusers pipeline folder (no model_index.json){hint}")
    for part in ("unet", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise InputError(f"{path}: diffusers pipeline folder without '{part}/'; scanning needs unet, text_encoder and tokenizer")


def load_model(
    model: str | Path,
    device: str = "auto",
    dtype: str = "fp32",
    with_vae: bool = False,
    config: str | Path | None = None,
) -> LoadedModel:
    """Load a pipeline from a local diffusers folder, a single .safetensors file or a hub id; never downloads.

    A hub id is read from the local Hugging Face cache only (``local_files_only``).
    A single file is converted by diffusers' ``from_single_file`` with ``config``
    (a local diffusers config folder) or the cached default config
    (engine/single_file.py). The VAE is skipped unless ``with_vae`` (full sampling
    needs it; scanning does not).
    """
    from diffusers import DiffusionPipeline

    source = str(model)
    path = Path(source).expanduser()
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    local = path.exists() or source.startswith((".", "/", "~"))
    config_dir = Path(config).expanduser() if config is not None else None
    if path.is_file():
        from nemo_surgery.engine.single_file import load_single_file

        with _quiet_diffusers():
            pipe = load_single_file(path, config_dir, torch_dtype, with_vae)
        return _finish(pipe, source, torch_device, torch_dtype, dtype)
    if config_dir is not None:
        raise InputError(f"--config {config_dir}: only used with a single-file --model (a .safetensors file)")
    if local:
        _check_local_pipeline(path)
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False, "local_files_only": True}
    if not with_vae:
        extra["vae"] = None
    try:
        with _quiet_diffusers():
            pipe = DiffusionPipeline.from_pretrained(str(path) if local else source, torch_dtype=torch_dtype, **extra)
    except InputError:
        raise
    except Exception as exc:  # diffusers raises many types: OSError, EnvironmentError, HTTP errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise InputError(f"{path}: could not load the pipeline ({first[:200]})") from None
        raise InputError(
            f"{source}: not a local folder and not in the local Hugging Face cache ({first[:160]}); "
            "download it first (e.g. `hf download ID`) or pass a local pipeline folder"
        ) from None
    return _finish(pipe, source, torch_device, torch_dtype, dtype)


def _finish(pipe: Any, source: str, torch_device: torch.device, torch_dtype: torch.dtype, dtype: str) -> LoadedModel:
    """Check the parts scanning needs, move to the device, freeze, and wrap the pipeline."""
    for part in ("unet", "text_encoder", "tokenizer"):
        if getattr(pipe, part, None) is None:
            raise InputError(f"{source}: pipeline has no {part}; nemo-surgery needs a Stable Diffusion pipeline")
    with _quiet_diffusers():
        pipe.to(torch_device)
    if torch_device.type == "cpu" and torch_dtype != torch.float32:
        from nemo_surgery.console import warn

        warn(f"--dtype {dtype} on the CPU is slow and not supported by every operation; --dtype fp32 is the CPU choice")
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.eval().requires_grad_(False)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, source=source, device=torch_device, dtype=torch_dtype)
