"""The demo world's prompt-alignment score in verify: hold-out scene captions read back by the checker, paired."""

from __future__ import annotations

import numpy as np
import pytest

from nemo_surgery.demo import world
from nemo_surgery.verify.scenes import scene_alignment, sign_test_p


def test_every_scene_caption_parses_back_to_its_scene():
    scenes = world.all_scenes()
    assert len(scenes) == len({s.caption() for s in scenes}) == 1800
    assert all(world.scene_of(s.caption()) == s for s in scenes)
    assert world.scene_of("  " + scenes[7].caption() + "\n") == scenes[7]
    assert world.scene_of("a photo of a dog") is None and world.scene_of("a portrait of an astronaut") is None
    parsed = [world.scene_of(c) for c in world.holdout_captions()]
    assert sum(s is not None for s in parsed) == 50  # the 50 scenes; the 10 unseen subjects are not scenes


def test_sign_test_is_exact():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(1, 1) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 * 0.5 ** 6)
    assert sign_test_p(0, 6) == sign_test_p(6, 0)
    assert sign_test_p(5, 1) == pytest.approx(2 * 7 / 64)


def _renders(scenes: list[world.Scene], seeds: int) -> np.ndarray:
    return np.stack([np.stack([s.render()] * seeds) for s in scenes])


def test_scene_alignment_pairs_samples_and_skips_other_captions():
    scenes = world.holdout_scenes(4)
    texts = [s.caption() for s in scenes[:2]] + ["a photo of a dog"] + [s.caption() for s in scenes[2:]]
    before = _renders([scenes[0], scenes[1], scenes[0], scenes[2], scenes[3]], 2)
    after = before.copy()
    after[0, 1] = scenes[1].render()  # seed 1 of the first caption shows another scene: lost
    before[3, 0] = np.zeros_like(before[3, 0])  # the original failed there, the pruned model does not: gained
    after[2] = np.zeros_like(after[2])  # the unseen-subject row is not read at all
    black = np.zeros_like(before)
    res = scene_alignment(texts, before, after, [before, black])
    assert (res.prompts, res.samples, res.lost, res.gained) == (4, 8, 1, 1)
    assert (res.before, res.after, res.controls) == (7 / 8, 7 / 8, [7 / 8, 0.0])
    assert res.p_value == 1.0 and not res.changed
    assert res.to_json()["changed"] is False and "lost, 1 gained" in res.summary()

    ruined = before.copy()
    ruined[[0, 1, 3, 4]] = 0.0
    hit = scene_alignment(texts, before, ruined, [])
    assert (hit.lost, hit.gained, hit.after, hit.controls) == (7, 0, 0.0, [])
    assert hit.p_value == pytest.approx(2 * 0.5 ** 7) and hit.changed and "CHANGED" in hit.summary()

    assert scene_alignment(["a photo of a dog"], before[2:3], after[2:3], []) is None
    big = np.zeros((1, 1, 64, 64, 3), dtype=np.float32)
    assert scene_alignment(texts[:1], big, big, []) is None  # not the world's image size: not read
