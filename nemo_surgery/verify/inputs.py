"""Resolve and validate verification inputs before any model is loaded (one-line InputErrors)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nemo_surgery.engine.prompts import Prompt, read_prompts
from nemo_surgery.engine.stats import Stats, load_stats
from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import NeuronSet, load_neuron_set
from nemo_surgery.provenance import sha256_file
from nemo_surgery.verify.harm import ImageCaption, read_image_captions
from nemo_surgery.verify.loadable import loadable
from nemo_surgery.verify.options import VerifyOptions

REPORT_DIR_NAME = "nemo_report"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class VerifyInputs:
    """Inputs resolved and validated before any model is loaded (each file parsed once)."""

    neurons_path: Path
    neuron_set: NeuronSet
    blocked: dict[str, list[int]]
    stats_path: Path
    stats: Stats
    prompts: list[Prompt]
    holdout: list[Prompt]
    train: dict[int, Path]
    holdout_images: list[ImageCaption] = field(default_factory=list)
    undetected: list[Prompt] = field(default_factory=list)  # scanned, not flagged, with a training image


def resolve_stats_path(explicit: Path | None, neuron_set: NeuronSet, neurons_path: Path) -> Path:
    """--stats, else the statistics path recorded in the neuron set (as given, or beside the set)."""
    if explicit is not None:
        return explicit
    recorded = ((neuron_set.settings or {}).get("stats") or {}).get("path")
    if recorded:
        for candidate in (Path(recorded), neurons_path.parent / recorded):
            if candidate.is_file():
                return candidate
        raise InputError(f"{neurons_path}: the statistics it was made with ({recorded}) are not found; pass --stats STATS")
    raise InputError(f"{neurons_path}: records no statistics file; pass --stats STATS (from `nemo-surgery stats`)")


def memorized_prompts(options: VerifyOptions, neuron_set: NeuronSet, neurons_path: Path) -> list[Prompt]:
    """--prompts, else the prompts the neuron set records as memorized."""
    if options.prompts is not None:
        return read_prompts(options.prompts, options.column)
    found = [Prompt(index=int(p["index"]), text=str(p["prompt"]), line=0)
             for p in neuron_set.prompts if p.get("memorized") and "prompt" in p and "index" in p]
    if not found:
        raise InputError(f"{neurons_path}: lists no memorized prompt to verify on; pass --prompts PROMPTS")
    return found


def undetected_prompts(options: VerifyOptions, neuron_set: NeuronSet) -> list[Prompt]:
    """Scanned prompts that detection did not flag, judged too when --train-images holds their image.

    Only without --prompts (which names the prompts to judge) and with
    --train-images: a copy of a training image the user gave is a copy,
    whether or not NeMo's first-step detection flagged the prompt.
    """
    if options.prompts is not None or options.train_images is None:
        return []
    return [Prompt(index=int(p["index"]), text=str(p["prompt"]), line=0)
            for p in neuron_set.prompts if p.get("memorized") is False and "prompt" in p and "index" in p]


def train_image_map(path: Path | None, prompts: list[Prompt]) -> dict[int, Path]:
    """Map prompt index -> training image: ``DIR/<index>.<ext>``, or a JSON mapping file.

    The mapping file (``DIR/mapping.json`` or a ``.json`` path given directly)
    maps a prompt index or the prompt text to an image path, relative to the file.
    """
    if path is None:
        return {}
    if not path.exists():
        raise InputError(f"{path}: --train-images not found; pass a folder of <prompt index>.png or a mapping .json")
    mapping_file = path if path.is_file() else path / "mapping.json"
    found: dict[int, Path] = {}
    if mapping_file.is_file():
        try:
            doc = json.loads(mapping_file.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("top level is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{mapping_file}: not a JSON mapping of prompt index or text to image path ({exc})") from None
        for p in prompts:
            target = doc.get(str(p.index), doc.get(p.text))
            if target is not None:
                found[p.index] = mapping_file.parent / str(target)
    elif path.is_dir():
        for p in prompts:
            for suffix in IMAGE_SUFFIXES:
                if (path / f"{p.index}{suffix}").is_file():
                    found[p.index] = path / f"{p.index}{suffix}"
                    break
    else:
        raise InputError(f"{path}: --train-images takes a folder or a .json mapping file")
    missing = [str(v) for v in found.values() if not v.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: training image listed in the mapping is not found")
    return found


def default_report_dir(pruned: Path) -> Path:
    """Report folder: ``<PRUNED>/nemo_report`` for a pipeline folder (travels with it), ``<PRUNED>.nemo_report`` beside a single file."""
    pruned = Path(pruned)
    if pruned.is_file():
        return pruned.with_name(pruned.name + "." + REPORT_DIR_NAME)
    return pruned / REPORT_DIR_NAME


def model_config(path: str | Path, config: Path | None) -> Path | None:
    """The --config folder for loading ``path``: given to single files only (a pipeline folder has its own)."""
    return config if Path(path).is_file() else None


def check_models(original: Path, pruned: Path, config: Path | None = None) -> None:
    """Both must be loadable (pipeline folders or whole-pipeline single files) and different; --config needs a single file."""
    for name, path in (("ORIGINAL", original), ("PRUNED", pruned)):
        if not loadable(path):
            raise InputError(f"{path}: {name} must be a diffusers pipeline folder with unet, text_encoder, tokenizer "
                             "and vae, or a single-file .safetensors checkpoint holding UNet, VAE and text encoder "
                             "(verify samples full images)")
    if Path(pruned).resolve() == Path(original).resolve():
        raise InputError(f"{pruned}: PRUNED is the same path as ORIGINAL; pass the output of `nemo-surgery apply`")
    check_config(config, original, pruned)


def check_config(config: Path | None, *paths: Path | str) -> None:
    """--config is for single files: refuse it when every one of ``paths`` is a folder."""
    if config is not None and not any(Path(p).is_file() for p in paths):
        raise InputError(f"--config {config}: only used with single-file checkpoints; {', '.join(map(str, paths))} "
                         "are pipeline folders (drop --config)")


def ema_notes(pruned: Path) -> list[str]:
    """Notes on EMA weights in PRUNED that apply patched but verify does not sample (unet_ema/, model_ema.*)."""
    from nemo_surgery.errors import NemoError
    from nemo_surgery.keymap import LDM_EMA_PREFIX
    from nemo_surgery.surgery.safetensors_file import read_header

    pruned = Path(pruned)
    if (pruned / "unet_ema").is_dir():
        return ["PRUNED has unet_ema/ (EMA weights; apply patches it with the same rows): verify loads and samples "
                "unet/ only, so the EMA UNet is not verified here"]
    if pruned.is_file():
        try:
            has_ema = any(k.startswith(LDM_EMA_PREFIX) for k in read_header(pruned).tensors)
        except NemoError:
            return []
        if has_ema:
            return ["PRUNED holds model_ema.* copies (apply patches them with the same rows): diffusers loads "
                    "model.diffusion_model.* only, so the EMA weights are not verified here"]
    return []


def digest_model(path: Path) -> dict[str, str]:
    """SHA-256 of a single file, or of a pipeline folder's UNet weight files (unet/ and unet_ema/) and model_index.json."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    out = {}
    found = [path / "model_index.json"]
    for part in ("unet", "unet_ema"):
        found += [*(path / part).glob("*.safetensors"), *(path / part).glob("*.safetensors.index.json")]
    for f in sorted(found):
        if f.is_file():
            out[str(f.relative_to(path))] = sha256_file(f)
    return out


def precheck_inputs(neurons: str | Path, options: VerifyOptions, neuron_set: NeuronSet | None = None) -> VerifyInputs:
    """Resolve and validate every input file (InputError with one line); loads no model.

    ``neuron_set`` is the already-parsed set at ``neurons`` (parsed here when None).
    """
    neurons_path = Path(neurons)
    if neuron_set is None:
        neuron_set = load_neuron_set(neurons_path)
    blocked = {ln.id: list(ln.neurons) for ln in neuron_set.nonempty()}
    if not blocked:
        raise InputError(f"{neurons_path}: the neuron set holds no neurons; nothing to verify")
    if options.config is not None and not Path(options.config).is_dir():
        raise InputError(f"--config {options.config}: not a folder; pass a local diffusers pipeline folder of this "
                         "model type (configs and tokenizer; weights are not needed)")
    stats_path = resolve_stats_path(options.stats, neuron_set, neurons_path)
    stats = load_stats(stats_path)
    prompts = memorized_prompts(options, neuron_set, neurons_path)
    holdout = read_prompts(options.holdout, options.column) if options.holdout is not None else []
    if options.holdout is not None and len(holdout) < 2:
        raise InputError(f"{options.holdout}: at least 2 hold-out prompts are needed (drift and copy threshold)")
    if options.seed == stats.settings.seed:
        raise InputError(f"--seed {options.seed} is the seed of scan's detection noise ({stats_path}); pass another "
                         "--seed so that verification runs on fresh seeds")
    for name, value in (("--sscd", options.sscd), ("--clip", options.clip)):
        if value is not None and not Path(value).exists():
            raise InputError(f"{value}: {name} path not found (optional metrics are read from local files only)")
    if options.sscd is not None and not Path(options.sscd).is_file():
        raise InputError(f"{options.sscd}: --sscd takes a TorchScript file")
    if options.clip is not None and not Path(options.clip).is_dir():
        raise InputError(f"{options.clip}: --clip takes a local model folder")
    pairs = read_image_captions(options.holdout_images) if options.holdout_images is not None else []
    passed = undetected_prompts(options, neuron_set)
    train = train_image_map(options.train_images, prompts + passed)
    return VerifyInputs(neurons_path, neuron_set, blocked, stats_path, stats, prompts, holdout, train, pairs,
                        [p for p in passed if p.index in train])
