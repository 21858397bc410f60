"""The one options model of verification: every knob with its default and help, CLI flags generated from it.

Each field of :class:`VerifyOptions` carries its help text and CLI group in
``metadata``; ``nemo_surgery.cli.verify`` turns the fields into click options for
``verify`` and ``apply``, so a default is written exactly once (here).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

    stats: Path | None = option(None, "Statistics (tau) from `nemo-surgery stats` (default: the file the neuron "
                                "set records).", group="input", kind="path")
    prompts: Path | None = option(None, "Memorized prompts to verify on (default: those the neuron set records as "
                                  "memorized).", group="input", kind="path")
    holdout: Path | None = option(None, "Non-memorized prompts for drift and sample-agreement calibration "
                                  "(default: drift not measured).", group="input", kind="path")
    train_images: Path | None = option(None, "Folder of <prompt index>.png training images, or a JSON mapping "
                                       "(index or prompt -> image).", group="input", kind="path")
    column: str = option("prompt", "Prompt column of CSV/JSONL prompt files.", group="input")
    report: Path | None = option(None, "Report folder (default: <PRUNED>/nemo_report).", group="report", kind="path")
    seeds: int = option(4, "Samples per prompt (same seeds before and after).", low=2)
    seed: int = option(0, "Seed of the one CPU generator that draws the initial noise.")
    steps: int = option(50, "DDIM steps of full sampling.", low=1)
    guidance: float = option(7.5, "Classifier-free guidance scale of full sampling.")
    batch_size: int = option(8, "Samples per UNet call.", low=1)
    max_drift: float = option(0.1, "Most allowed hold-out drift (1 - mean SSIM of samples before/after).",
                              low=0, high=1)
    max_train_similarity: float = option(0.3, "Every after-sample's SSIM to its training image must stay below "
                                         "this.", low=0, high=1)
    max_sample_agreement: float | None = option(
        None, "Most allowed mean pairwise SSIM of a prompt's samples across seeds (default: hold-out mean + 1 std "
        "on the original; 0.5 without --holdout).", kind="float", low=-1, high=1)
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
