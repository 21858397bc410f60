"""The v2 demo world: scenes, the alignment checker, and the memory-rows training script."""

from __future__ import annotations

import json

import numpy as np
import torch

from tools.demo_model import checker, memory_rows, world


def test_checker_reads_every_clean_and_noisy_scene():
    rng = np.random.default_rng(7)
    for _ in range(300):
        scene = world.random_scene(rng)
        img = scene.render()
        assert checker.aligned(scene, img), (scene, checker.read_scene(img))
        noisy = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
        assert checker.aligned(scene, noisy), scene


def test_checker_rejects_other_captions_and_photos():
    rng = np.random.default_rng(8)
    accepted = 0
    for _ in range(300):
        a, b = world.random_scene(rng), world.random_scene(rng)
        if a.caption() != b.caption():
            accepted += checker.aligned(a, b.render())
    assert accepted == 0
    photos = world.famous_images()
    scenes = world.holdout_scenes(40)
    assert not any(checker.aligned(s, p) for s in scenes for p in photos)


def test_checker_names_the_wrong_claim():
    scene = world.Scene("red", "blue", "circle", pos="left", size="large")
    moved = world.Scene("red", "blue", "circle", pos="right", size="large").render()
    claims = checker.alignment(scene, moved)
    assert claims["position"] is False
    assert all(v for k, v in claims.items() if k != "position")
    recoloured = world.Scene("green", "blue", "circle", pos="left", size="large").render()
    assert checker.alignment(scene, recoloured)["colour"] is False
    counted = world.Scene("red", "blue", "square", count=3).render()
    assert checker.read_scene(counted).count == 3


def test_holdout_is_disjoint_from_training_texts():
    hold = world.holdout_captions()
    assert len(hold) == 60 and len(set(hold)) == 60  # >= 59: enough for a 0.05 false-positive rate
    assert not set(hold) & set(world.SUBJECT_CAPTIONS)
    assert not set(hold) & {f.caption for f in world.FAMOUS}


def test_memory_rows_script_few_steps(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "model"
    memory_rows.main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--save-every", "1"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size == world.SIZE == 32
    default = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_v") and not n.startswith("up_blocks")]
    assert sum(m.out_features for m in default) >= 1000  # the "about 1,000 value neurons"
    summary = json.loads((out / "train_config.json").read_text())
    assert summary["memory_rows"] == [dict(item) for item in memory_rows.MEMORY_ROWS]
    assert (out / "steps" / "1" / "unet").is_dir()
    # every reserved row names a real default-layer value row, and no row is reserved twice
    seen = set()
    for item in memory_rows.MEMORY_ROWS:
        for name, rows in item.items():
            width = pipe.unet.get_submodule(name).out_features
            assert all(0 <= r < width for r in rows) and not name.startswith("up_blocks")
            assert not seen & {(name, r) for r in rows}
            seen |= {(name, r) for r in rows}
