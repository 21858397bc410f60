"""Smoke test: the demo training script runs a few steps and writes a loadable pipeline."""

from __future__ import annotations

import json

import numpy as np
import torch

from tools.demo_model import data, train
from tools.demo_model.evaluate import load_pipeline
from tools.demo_model.pixel_vae import build_pixel_vae


def test_train_script_few_steps(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "model"
    train.main(["--out", str(out), "--steps", "2", "--base-steps", "2", "--batch-size", "4",
                "--recipe", "finetune-localized", "--rows-per-item", "1"])
    pipe = load_pipeline(out)
    assert pipe.unet.config.in_channels == 3
    assert pipe.vae.config.scaling_factor == 1.0
    summary = json.loads((out / "train_config.json").read_text())
    rows = summary["trained_value_rows"]
    assert sum(len(r) for r in rows.values()) == len(data.MEMORIZED)
    assert all(not n.startswith("up_blocks") for n in rows)
    # rows outside the trained set are bit-identical to the base model
    base = load_pipeline(out / "base")
    for name, mod in train.value_layers(pipe.unet).items():
        keep = torch.ones(mod.out_features, dtype=torch.bool)
        keep[rows.get(name, [])] = False
        ref = dict(base.unet.named_modules())[name].weight
        assert torch.equal(mod.weight[keep], ref[keep])


def test_pixel_vae_is_identity():
    vae = build_pixel_vae(3, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.decode(x).sample, x, atol=1e-4)
        assert torch.allclose(vae.encode(x).latent_dist.mean, x, atol=1e-4)


def test_data_is_deterministic_and_in_range():
    imgs = data.memorized_images(16)
    assert len(imgs) == len(data.MEMORIZED)
    assert all(im.shape == (16, 16, 3) and 0 <= im.min() and im.max() <= 1 for im in imgs)
    a = data.sample_generic(np.random.default_rng(3))
    b = data.sample_generic(np.random.default_rng(3))
    assert a[1] == b[1] and np.array_equal(a[0], b[0])
    hold = data.holdout_captions()
    assert 40 <= len(hold) <= 60
    assert not set(hold) & {m.caption for m in data.MEMORIZED}
