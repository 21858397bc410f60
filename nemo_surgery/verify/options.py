"""The one options model of verification: every knob with its default and help, CLI flags generated from it.

Each field of :class:`VerifyOptions` carries its help text and CLI group in
``metadata``; ``nemo_surgery.cli.verify`` turns the fields into click options for
``verify`` and ``apply``, so a default is written exactly once (here).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_surgery.verify.seeds import DEFAULT_SEEDS

#: Default number of random control sets (the demo's verify stays within minutes on 2 CPU cores). Kept here,
#: not in verify.controls, so that the CLI's start (apply --no-verify included) does not import numpy.
DEFAULT_CONTROLS = 2

if TYPE_CHECKING:  # sampling imports torch; the CLI builds its flags from this module without it
    from nemo_surgery.verify.sampling import SampleSettings

#: CLI groups: ``input`` and ``tuning`` appear on verify and apply, ``report`` on verify only,
#: ``device`` comes from the shared --device/--dtype helper, ``library`` is not a flag.
GROUPS = ("input", "report", "tuning", "device", "library")


def option(default: Any, help: str, *, group: str = "tuning", kind: str | None = None,
           low: float | None = None, high: float | None = None) -> Any:
    """A dataclass field that also describes its CLI flag (``kind``: path, int, float, str; ``low``/``high``: range)."""
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    kind = kind or {bool: "flag", int: "int", float: "float", str: "str"}.get(type(default))
    return field(default=default, metadata={"help": help, "group": group, "kind": kind, "low": low, "high": high})


@dataclass(frozen=True)
class VerifyOptions:
    """Inputs and knobs of one verification run; the defaults are the CLI defaults."""

    config: Path | None = option(None, "With a single-file .safetensors checkpoint: a local diffusers folder of the "
                                 "same model type (configs and tokenizer; weights not needed). Without it the "
                                 "default config must be in the local Hugging Face cache.", group="input", kind="path")
    stats: Path | None = option(None, "Statistics (tau) from `nemo-surgery stats` (default: the file the neuron "
                                "set records).", group="input", kind="path")
    prompts: Path | None = option(None, "Memorized prompts to verify on (default: those the neuron set records as "
                                  "memorized, plus, with --train-images, the scanned prompts scan passed that have "
                                  "a training image: a pruned copy of it fails the verdict).", group="input",
                                  kind="path")
    holdout: Path | None = option(None, "Non-memorized prompts: harm (drift) and the copy-threshold calibration. "
                                  "Without it the verdict cannot be 'verified'.", group="input", kind="path")
    holdout_images: Path | None = option(None, "Hold-out image-caption pairs (CSV image,caption or a folder of image "
                                         "+ .txt) for the denoising-loss harm measure.", group="input", kind="path")
    train_images: Path | None = option(None, "Folder of <prompt index>.png training images, or a JSON mapping "
                                       "(index or prompt -> image); default reference: the medoid of the original's "
                                       "samples. Without --prompts, scanned prompts that detection passed are judged "
                                       "against theirs too.", group="input", kind="path")
    column: str = option("prompt", "Prompt column of CSV/JSONL prompt files.", group="input")
    report: Path | None = option(None, "Report folder (default: <PRUNED>/nemo_report; <PRUNED>.nemo_report beside a "
                                 "single-file PRUNED).", group="report", kind="path")
    seeds: int = option(DEFAULT_SEEDS, "Fresh seeds per memorized prompt, judged one by one (10: zero copies bound "
                        "the copy rate below 25.9 % with 95 % confidence).", low=2)
    seed: int = option(1000, "Seed of the generator of the verification noise; must differ from scan's detection "
                       "seed (fresh seeds).")
    holdout_seeds: int = option(4, "Own seeds per hold-out prompt (drift and copy-threshold calibration; aim for "
                                "prompts x seeds >= 20 x --seeds, e.g. 50 prompts x 4).", low=1)
    drift_seeds: int = option(2, "Own seeds per hold-out prompt for drift (original, pruned and every control).",
                              low=1)
    steps: int = option(50, "DDIM steps of full sampling.", low=1)
    guidance: float = option(7.5, "Classifier-free guidance scale of full sampling.")
    batch_size: int = option(8, "Samples per UNet call.", low=1)
    controls: int = option(DEFAULT_CONTROLS, "Random control sets matched per layer (GPU users: 16-32); 0 skips "
                           "them and the verdict cannot be 'verified'.", low=0)
    control_seed: int = option(0, "Seed of the control draw (recorded in the report).")
    copy_threshold: float | None = option(None, "SSIM to the reference at which a sample counts as a copy "
                                          "(default: calibrated on --holdout samples).", kind="float", low=0, high=1)
    max_drift: float | None = option(None, "Absolute limit on hold-out drift (1 - mean SSIM of samples "
                                     "before/after); default: only the comparison with the controls.", kind="float",
                                     low=0, high=1)
    max_loss_increase: float | None = option(None, "Absolute limit on the relative denoising-loss increase on "
                                             "--holdout-images; default: only the comparison with the controls.",
                                             kind="float")
    sscd: Path | None = option(None, "Local TorchScript SSCD model (optional).", kind="path")
    clip: Path | None = option(None, "Local CLIP model folder (optional).", kind="path")
    attack: bool = option(False, "Adaptive-attack robustness probe: optimise each memorized prompt's conditioning "
                          "on the pruned model toward its training image (needs --train-images); compared with the "
                          "same attack on the original and on a never-memorized control. Verdict robust/shallow.")
    attack_steps: int = option(50, "Adam steps of the adaptive attack.", low=1)
    attack_lr: float = option(0.1, "Learning rate of the adaptive attack.", low=0)
    attack_batch: int = option(8, "Noises/timesteps per prompt per attack step.", low=1)
    require_robust: bool = option(False, "Fail (exit 3) when the adaptive attack finds the pruning shallow; "
                                  "without it a shallow finding is a warning.")
    device: str = option("auto", "Device (see --device).", group="device")
    dtype: str = option("fp32", "Weights and activations dtype (see --dtype).", group="device")
    equivalence_seeds: int = option(2, "Latents of the equivalence check.", group="library")
    score_batch_size: int = option(32, "Samples per UNet call of the first-step scores.", group="library")

    @property
    def sampling(self) -> SampleSettings:
        """How full samples are drawn (identical before and after pruning)."""
        from nemo_surgery.verify.sampling import SampleSettings

        return SampleSettings(seeds=self.seeds, seed=self.seed, steps=self.steps, guidance=self.guidance,
                              batch_size=self.batch_size)

    def replace(self, **changes: Any) -> VerifyOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> VerifyOptions:
        """Build options from a mapping that may hold other keys too (e.g. all click parameters)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def option_fields(*groups: str) -> list[Any]:
    """The dataclass fields of VerifyOptions in the given CLI groups, in declaration order."""
    return [f for f in fields(VerifyOptions) if f.metadata.get("group") in groups and f.default is not MISSING]
