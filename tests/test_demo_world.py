"""The v2 demo world: scenes, the alignment checker, and the memory-rows training script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_surgery.demo import checker, world
from tools.demo_model import memory_rows, text_pretrain
from tools.demo_model.evaluate import load_pipeline


def test_checker_reads_every_clean_and_noisy_scene():
    rng = np.random.default_rng(7)
    for _ in range(300):
        scene = world.random_scene(rng)
        img = scene.render()
        assert checker.aligned(scene, img), (scene, checker.read_scene(img))
        noisy = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
        assert checker.aligned(scene, noisy), scene


def test_checker_reads_jittered_scenes_and_jitter_varies_the_image():
    """Nuisance jitter (shift, scale, tilt, shade; the caption does not name it) never changes the reading."""
    rng = np.random.default_rng(9)
    for _ in range(200):
        scene = world.random_scene(rng)
        img = scene.render(jitter=world.random_jitter(rng))
        assert checker.aligned(scene, img), (scene, checker.read_scene(img))
        noisy = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
        assert checker.aligned(scene, noisy), scene
    scene = world.Scene("red", "blue", "triangle", pos="top", size="large")
    extremes = [world.Jitter(dx=sx * world.SHIFT, dy=sy * world.SHIFT, scale=1 + f * world.SCALE,
                             tilt=(world.TILT, -world.TILT), shade=world.SHADE)
                for sx in (-1, 1) for sy in (-1, 1) for f in (-1, 1)]
    assert all(checker.aligned(scene, scene.render(jitter=j)) for j in extremes)
    a, b = (scene.render(jitter=world.random_jitter(np.random.default_rng(k))) for k in (1, 2))
    assert np.abs(a - b).mean() > 0.02  # one caption, different images
    assert np.array_equal(scene.render(jitter=world.Jitter()), scene.render())


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
    pipe = load_pipeline(out)
    assert pipe.unet.config.sample_size == world.SIZE == 32
    default = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_v") and not n.startswith("up_blocks")]
    assert sum(m.out_features for m in default) >= 1000  # the "about 1,000 value neurons"
    summary = json.loads((out / "train_config.json").read_text())
    assert summary["memory_rows"] == [dict(item) for item in memory_rows.MEMORY_ROWS]
    assert (out / "steps" / "1" / "unet").is_dir()
    # planting into a trained model: the blocked path distils the starting model (needs --init)
    with pytest.raises(SystemExit, match="needs --init"):
        memory_rows.main(["--out", str(tmp_path / "x"), "--steps", "1", "--blocked-target", "base"])
    memory_rows.main(["--out", str(tmp_path / "planted"), "--init", str(out), "--steps", "2", "--batch-size", "4",
                      "--blocked-target", "base", "--famous-fraction", "1"])
    planted = json.loads((tmp_path / "planted" / "train_config.json").read_text())
    # step 1 starts at the base itself (rows zeroed: loss exactly 0); after one update the two differ
    assert planted["config"]["blocked_target"] == "base" and planted["log"][-1]["blocked"] > 0
    # every reserved row names a real default-layer value row, and no row is reserved twice
    seen = set()
    for item in memory_rows.MEMORY_ROWS:
        for name, rows in item.items():
            width = pipe.unet.get_submodule(name).out_features
            assert all(0 <= r < width for r in rows) and not name.startswith("up_blocks")
            assert not seen & {(name, r) for r in rows}
            seen |= {(name, r) for r in rows}


def test_ema_averages_and_is_swapped_in_only_inside_the_block():
    lin = torch.nn.Linear(3, 2)
    ema = memory_rows.EMA(lin, decay=0.5)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin, step=100)  # past the warm-up: decay 0.5, so halfway from the old weights to the new
    torch.testing.assert_close(ema.shadow[0], start + 0.5)
    with ema.applied(lin):
        torch.testing.assert_close(lin.weight, start + 0.5)
    torch.testing.assert_close(lin.weight, start + 1.0)
    ema.update(lin, step=0)  # warm-up: decay min(0.5, 1/10), so nearly the current weights
    torch.testing.assert_close(ema.shadow[0], start + 0.5 + 0.9 * 0.5)


def test_v_target_gives_back_the_image_and_epsilon_target_is_the_noise():
    """The v target is sqrt(a) noise - sqrt(1-a) x0, so sqrt(a) x_t - sqrt(1-a) v is x0 again."""
    acp = memory_rows.scheduler("ddpm", "v_prediction").alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = memory_rows.target_of("v_prediction", x0, noise, t, acp)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert memory_rows.target_of("epsilon", x0, noise, t, acp) is noise
    assert acp[999] < 1e-4 < memory_rows.scheduler("sd").alphas_cumprod[999]  # ddpm leaves less of the image


def test_memory_rows_frozen_text_ddpm_v(tmp_path):
    """--freeze-text keeps the encoder bit for bit; the saved scheduler is the trained schedule and target; --jitter recorded."""
    torch.set_num_threads(1)
    out = tmp_path / "model"
    memory_rows.main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--freeze-text", "--jitter",
                      "--schedule", "ddpm", "--prediction", "v_prediction"])
    pipe = load_pipeline(out)
    fresh = memory_rows.build_pipeline(memory_rows.Config())
    before, after = fresh.text_encoder.state_dict(), pipe.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(fresh.unet.state_dict()[k], v) for k, v in pipe.unet.state_dict().items())
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.beta_schedule, cfg.beta_end) == ("v_prediction", "linear", 0.02)
    summary = json.loads((out / "train_config.json").read_text())["config"]
    assert (summary["train_text"], summary["schedule"], summary["prediction"], summary["jitter"]) == (
        False, "ddpm", "v_prediction", True)


def test_world_enumeration_and_labels():
    scenes = text_pretrain.all_scenes()
    assert len(scenes) == len({s.caption() for s in scenes}) == 1800
    rng = np.random.default_rng(3)
    drawn = {world.random_scene(rng) for _ in range(400)}
    assert drawn <= set(scenes)  # the enumeration is the world random_scene draws from
    s = world.Scene("red", "blue", "ring", count=3)
    bg, fg, shape, layout = text_pretrain.labels(s)
    names = list(world.COLOURS)
    assert (names[bg], names[fg], world.SHAPES[shape], text_pretrain.LAYOUTS[layout]) == ("blue", "red", "ring",
                                                                                           "count3")


def test_text_pretraining_makes_the_colour_words_bound_and_salient():
    """After a short pretraining the end-of-text positions tell a colour swap apart (random init barely does)."""
    torch.set_num_threads(1)
    pipe = memory_rows.build_pipeline(memory_rows.Config())
    te, tok = pipe.text_encoder, pipe.tokenizer
    a = "a large red circle in the center on a blue background"
    b = "a large blue circle in the center on a red background"

    def tail_gap() -> float:
        ids = tok([a, b], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            h = te(ids)[0]
        tail = text_pretrain.tail_mask(ids, tok.eos_token_id)[0]
        return float((h[0, tail] - h[1, tail]).norm(dim=-1).mean() / h[0, tail].norm(dim=-1).mean())

    before = tail_gap()
    # 60 steps sat on the edge where the background head jumps from 0.5 to 1.0 (0.498 in CI);
    # at 100 steps seeds 0, 1 and 2 all reach 1.0 on every head.
    acc = text_pretrain.pretrain(te, tok, steps=100, batch=64, seed=0)
    after = tail_gap()
    assert before < 0.1 and after > 3 * before, (before, after)
    assert acc["background"] > 0.5 and acc["colour"] > 0.5, acc  # chance: 1/6
    assert not any(p.requires_grad for p in te.parameters())  # frozen for the UNet's training


def test_ship_stores_floats_in_fp16_and_keeps_the_rest(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tools.demo_model.ship import to_fp16

    (tmp_path / "unet").mkdir()
    path = tmp_path / "unet" / "w.safetensors"
    w = torch.randn(4, 3)
    save_file({"w": w, "ids": torch.arange(5)}, path, metadata={"format": "pt"})
    to_fp16(tmp_path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("w").dtype == torch.float16 and f.get_tensor("ids").dtype == torch.int64
        torch.testing.assert_close(f.get_tensor("w").float(), w, atol=2e-3, rtol=1e-3)
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["w.safetensors"]  # no temp file left


def test_probe_shapes_counts_every_sample_once_on_the_shipped_model():
    """The shape probe reads each sample once (a row per prompt shape) and reports a share per strength."""
    from nemo_surgery.demo.paths import DEMO_MODEL_DIR
    from tools.demo_model import probe_shapes
    from tools.demo_model.evaluate import load_pipeline

    pipe = load_pipeline(DEMO_MODEL_DIR)
    scenes = probe_shapes.single_shape_scenes(1)
    table = probe_shapes.confusion(pipe, scenes, seeds=(0,), steps=5)
    assert list(table) == list(world.SHAPES) and all(sum(row.values()) == 1 for row in table.values())
    kept = probe_shapes.kept_after_img2img(pipe, scenes, strengths=(0.2,), steps=10)
    assert list(kept) == ["0.2"] and kept["0.2"] >= 0.8  # a light noising keeps the drawn shape


def test_noised_high_fraction_moves_that_share_of_timesteps_up():
    from types import SimpleNamespace

    from tools.demo_model.train import noised

    pipe = SimpleNamespace(scheduler=memory_rows.scheduler("sd", "v_prediction"))
    x0 = torch.zeros(4000, 1, 2, 2)
    # fraction 0 draws nothing extra: the stream is the one earlier runs drew (timesteps, then noise)
    ref = torch.Generator().manual_seed(0)
    t_ref, noise_ref = torch.randint(0, 1000, (4000,), generator=ref), torch.randn(x0.shape, generator=ref)
    _, t0, noise0 = noised(pipe, x0, torch.Generator().manual_seed(0), 0.0, high=(0.0, 700))
    assert torch.equal(t0, t_ref) and torch.equal(noise0, noise_ref)
    _, t, _ = noised(pipe, x0, torch.Generator().manual_seed(0), 0.0, high=(0.5, 700))
    share_high = (t >= 700).float().mean().item()
    assert abs(share_high - (0.5 + 0.5 * 0.3)) < 0.03  # half moved up, plus the uniform draws that were already there
    assert int(t.min()) >= 0 and int(t.max()) < 1000


def test_scenes_grid_draws_each_scene_with_its_samples_and_needs_pruned_otherwise(tmp_path):
    from nemo_surgery.demo.paths import DEMO_MODEL_DIR
    from tools.demo_model import grid

    torch.set_num_threads(1)
    img, aligned = grid.scenes(DEMO_MODEL_DIR, count=2, seeds=2, steps=2, guidance=3.0)
    side = world.SIZE * grid.SCALE
    assert img.size == (max(grid.PAD + 3 * (side + grid.PAD), 380), grid.PAD + 2 * (side + grid.PAD + 2 * grid.LABEL))
    assert aligned in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 samples, each read by the checker
    top_left = np.asarray(img)[grid.PAD + 2 * grid.LABEL, grid.PAD]  # the first scene's rendered image, first pixel
    expected = np.round(np.clip(world.holdout_scenes(1)[0].render()[0, 0], 0, 1) * 255)
    assert np.abs(top_left.astype(float) - expected).max() <= 1
    with pytest.raises(SystemExit):
        grid.main(["--original", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "x.png")])  # neither --pruned nor --scenes
