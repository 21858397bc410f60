"""Detection benchmark: recall against full samples, hold-out false-positive rate, screening speed.

Prints, for the shipped demo model and the planted test model, each rule side by side:

* ours: THE rule (engine/detection.py) with the shipped/computed statistics' calibration;
* NeMo's: a seed is kept when its best pairwise score exceeds tau; memorized when any seed is kept;
* mean: this project's first rule (mean pairwise score > tau).

Ground truth on the demo model: a caption is memorized when at least 2 of 10 full DDIM samples
(guidance 3, the demo recipe's sampling) reproduce its training image with SSIM >= COPY_SSIM
(scikit-image SSIM, 7x7 window, channels averaged; the verify step's calibrated copy threshold
replaces this once it lands). On the planted test model the truth is by construction: prompts with
the trigger word are memorized. Hold-out false-positive rates are given in-sample (the calibration
set itself) and 2-fold cross-validated (calibrate on one half of the hold-out statistics, count on
the other), each with a 95% Clopper-Pearson interval.

Run: python benchmarks/bench_detect.py [--quick]  (CPU, a few minutes; --quick skips the speed sweep)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nemo_surgery.engine.detection import calibrate, clopper_pearson, decide_many  # noqa: E402
from nemo_surgery.engine.model import load_model  # noqa: E402
from nemo_surgery.engine.prompts import read_prompts  # noqa: E402
from nemo_surgery.engine.score import Scorer, ScoreSettings  # noqa: E402
from nemo_surgery.engine.screen import pairwise_batch, run_detect  # noqa: E402
from nemo_surgery.engine.ssim import SSIMConfig  # noqa: E402
from nemo_surgery.engine.stats import compute_stats, load_stats  # noqa: E402

#: Copy threshold of the ground truth (SSIM of a full sample to the training image): issue 12's bar for the
#: 32x32 demo (v2); the 16x16 v1 demo was judged at 0.5.
COPY_SSIM = 0.7
#: Seeds that must reproduce the training image for a caption to count as memorized.
MIN_COPIES = 2


def rules(model, stats, texts: list[str], batch_size: int = 100) -> dict[str, list[bool]]:
    """Each rule's verdict for ``texts``: ours, NeMo's and the mean rule."""
    scorer = Scorer(model, model.layers, stats.settings, batch_size=batch_size)
    mats = pairwise_batch(scorer.noise_differences(model.encode(texts)), scorer)
    verdicts = decide_many(mats, stats.calibration)
    return {"ours": [v.memorized for v in verdicts], "NeMo": [v.nemo["memorized"] for v in verdicts],
            "mean": [v.mean_pairwise > stats.tau for v in verdicts]}


def holdout_rates(stats) -> dict[str, str]:
    """In-sample and 2-fold cross-validated hold-out false-positive rates of each rule."""
    agreement = stats.holdout_agreement
    n = agreement.shape[0]
    means = torch.tensor(stats.holdout_mean)
    cal = stats.calibration
    halves = (torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1)
    cross = 0
    for fit, test in (halves, halves[::-1]):
        half = calibrate(agreement[fit], stats.fpr, stats.tau)
        cross += int((agreement[test] > torch.tensor(half.thresholds) + 1e-6).any(dim=1).sum())

    def fmt(k: int) -> str:
        lo, hi = clopper_pearson(k, n)
        return f"{k}/{n} = {k / n:.3f} (95% CI {lo:.3f}-{hi:.3f})"

    return {"ours (in-sample)": fmt(cal.flagged), "ours (2-fold)": fmt(cross),
            "NeMo": fmt(int((agreement[:, 0] > stats.tau).sum())), "mean": fmt(int((means > stats.tau).sum()))}


def recall_line(truth: list[bool], verdicts: dict[str, list[bool]]) -> str:
    """Recall of each rule against the truth."""
    positives = sum(truth)
    parts = []
    for name, flags in verdicts.items():
        hits = sum(t and f for t, f in zip(truth, flags))
        parts.append(f"{name} {hits}/{positives}")
    return "recall: " + ", ".join(parts)


def demo(quick: bool) -> None:
    """The shipped demo model: ground truth from full samples vs each rule; hold-out FPR; screening speed."""
    from skimage.metrics import structural_similarity

    from nemo_surgery.demo.paths import DEMO_MODEL_DIR, DEMO_STATS, DEMO_TRAIN_IMAGES
    from nemo_surgery.verify.sampling import SampleSettings, sample_images

    model = load_model(DEMO_MODEL_DIR, device="cpu", dtype="fp32", with_vae=True)
    stats = load_stats(DEMO_STATS)
    captions = [p.text for p in read_prompts(ROOT / "prompts" / "demo_memorized.txt")]
    images = sample_images(model, model.encode(captions), SampleSettings(seeds=10, seed=0, steps=50, guidance=3.0,
                                                                         batch_size=50))
    from PIL import Image

    truth, copies = [], []
    for i in range(len(captions)):
        train = np.asarray(Image.open(DEMO_TRAIN_IMAGES / f"{i}.png").convert("RGB"), dtype=np.float32) / 255.0
        sims = [structural_similarity(np.asarray(img, dtype=np.float32), train, channel_axis=-1, data_range=1.0)
                for img in images[i].cpu().numpy()]
        copies.append(sum(s >= COPY_SSIM for s in sims))
        truth.append(copies[-1] >= MIN_COPIES)
    verdicts = rules(model, stats, captions)
    print(f"\n== demo model ({len(captions)} memorized-candidate captions, truth: >= {MIN_COPIES} of 10 samples with "
          f"SSIM >= {COPY_SSIM} to the training image)")
    for i, caption in enumerate(captions):
        print(f"  {caption!r}: copies {copies[i]}/10 -> truth {truth[i]}; ours {verdicts['ours'][i]}, "
              f"NeMo {verdicts['NeMo'][i]}, mean {verdicts['mean'][i]}")
    print("  " + recall_line(truth, verdicts))
    print(f"  hold-out false-positive rate (target {stats.fpr:g}, tau {stats.tau:.4f}):")
    for name, text in holdout_rates(stats).items():
        print(f"    {name}: {text}")
    if stats.calibration.warning:
        print(f"    warning: {stats.calibration.warning}")
    if quick:
        return
    holdout = read_prompts(ROOT / "prompts" / "demo_holdout.txt")
    print(f"  screening speed (detect on the {len(holdout)} hold-out prompts, CPU):")
    for batch in (10, 100):
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_detect(model, stats, DEMO_STATS, holdout, Path(tmp) / "r.jsonl", Path(tmp) / "f.txt",
                                 batch_size=batch)
        print(f"    --batch-size {batch}: {summary.prompts_per_second:.2f} prompts/s, "
              f"{summary.samples_per_call:.0f} samples per UNet call ({summary.unet_calls} calls)")


def planted() -> None:
    """The planted test model: truth by construction; hold-out FPR; fresh ordinary prompts."""
    from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT, build_planted_pipeline
    from tests.models.tiny import save_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe, _ = build_planted_pipeline()
        save_pipeline(pipe, Path(tmp) / "pipe")
        model = load_model(Path(tmp) / "pipe", device="cpu", dtype="fp32")
    _, h, w = model.latent_shape
    stats = compute_stats(model, list(ORDINARY_PROMPTS), ScoreSettings(ssim=SSIMConfig.fit(h, w)), batch_size=80)
    memorized = [TRIGGER_PROMPT, "an astronaut on the moon", "the astronaut walks", "astronaut portrait, oil"]
    fresh = ["a red car in the rain", "two dogs on a beach", "a bowl of soup", "a city at night", "a green field",
             "a man reading a book", "a cat sleeping", "a mountain lake"]
    verdicts = rules(model, stats, memorized + fresh, batch_size=80)
    truth = [True] * len(memorized) + [False] * len(fresh)
    print(f"\n== planted test model ({len(memorized)} trigger prompts, {len(fresh)} fresh ordinary prompts; "
          f"{stats.prompt_count} hold-out)")
    print("  " + recall_line(truth, verdicts))
    for name, flags in verdicts.items():
        fp = sum(f and not t for t, f in zip(truth, flags))
        print(f"  fresh ordinary prompts flagged by {name}: {fp}/{len(fresh)}")
    print(f"  hold-out false-positive rate (target {stats.fpr:g}, tau {stats.tau:.4f}):")
    for name, text in holdout_rates(stats).items():
        print(f"    {name}: {text}")


def main() -> None:
    """Run both benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the screening speed sweep")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    demo(args.quick)
    planted()
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
