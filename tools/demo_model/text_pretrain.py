"""Pretrain the demo's tiny text encoder to say what a caption claims, before the UNet sees it.

SD's UNet learns against a CLIP text encoder that was pretrained on image-text pairs, so
the words already reach it as distinct, salient features. The demo's encoder is tiny and
random: trained jointly with the UNet it merged the scene captions, and frozen at its
random init the colour words reached the UNet too weakly (docs/demo-model.md, runs B, 6
and 7). This stage is the demo's stand-in for CLIP's pretraining: linear heads read the
world's attributes (background colour, shape colour, shape, layout) and the caption's
kind (scene, one of the famous items, other subject) from every token position from the
end-of-text token on. Those positions see the whole caption through causal attention,
and they hold most of the UNet's cross-attention weight (46-88 % on the padding in run 6).
Afterwards the encoder is frozen and the heads are thrown away.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from nemo_surgery.demo import world
from tools.demo_model.train import TextCache

#: Layout classes: every (position, size) of a single shape, then the counts.
LAYOUTS: tuple[str, ...] = tuple(f"{p}/{s}" for p in world.POSITIONS for s in world.SIZES) + tuple(
    f"count{n}" for n in world.COUNTS)
KINDS = 2 + len(world.FAMOUS)  # scene, each famous item, any other subject


def all_scenes() -> list[world.Scene]:
    """Return every scene of the world (1,800: colour pairs x shapes x layouts)."""
    names = list(world.COLOURS)
    out = []
    for fg, bg in itertools.permutations(names, 2):
        for shape in world.SHAPES:
            out += [world.Scene(fg, bg, shape, pos=p, size=s) for p in world.POSITIONS for s in world.SIZES]
            out += [world.Scene(fg, bg, shape, count=n) for n in world.COUNTS]
    return out


def labels(scene: world.Scene) -> tuple[int, int, int, int]:
    """Return the (background, shape colour, shape, layout) class indices of a scene."""
    names = list(world.COLOURS)
    layout = f"{scene.pos}/{scene.size}" if scene.count == 1 else f"count{scene.count}"
    return names.index(scene.bg), names.index(scene.fg), world.SHAPES.index(scene.shape), LAYOUTS.index(layout)


class Heads(torch.nn.Module):
    """Linear read-outs of the attributes and the kind from one token's output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        n_col = len(world.COLOURS)
        self.out = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in
                                       (n_col, n_col, len(world.SHAPES), len(LAYOUTS), KINDS))

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Return the logits of every head for features `h` (..., width)."""
        return [head(h) for head in self.out]


def tail_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Return a (B, L) bool mask of the positions from each caption's first end-of-text token on."""
    is_eos = ids == eos
    return is_eos.cumsum(1) > 0


def pretrain(text_encoder, tokenizer, steps: int = 400, batch: int = 128, lr: float = 3e-3,
             seed: int = 0) -> dict:
    """Train `text_encoder` in place on the attribute and kind heads; returns the final accuracies.

    Scenes are labelled with all five heads, famous and subject captions with the kind head
    only. The hold-out subjects are not used (they stay unseen, as in the UNet's training).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    scenes = all_scenes()
    scene_caps = [s.caption() for s in scenes]
    scene_y = torch.tensor([labels(s) + (0,) for s in scenes])
    other_caps = [f.caption for f in world.FAMOUS] + list(world.SUBJECT_CAPTIONS)
    other_kind = torch.tensor([1 + k for k in range(len(world.FAMOUS))] + [KINDS - 1] * len(world.SUBJECT_CAPTIONS))

    cache = TextCache(tokenizer)
    scene_ids, other_ids = cache.ids(scene_caps), cache.ids(other_caps)
    eos = tokenizer.eos_token_id
    heads = Heads(text_encoder.config.hidden_size)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    text_encoder.train()
    text_encoder.requires_grad_(True)

    def loss_of(ids: torch.Tensor, y: torch.Tensor, kind_only: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = text_encoder(ids)[0]
        mask = tail_mask(ids, eos)
        logits = heads(h[mask])  # one row per tail position
        yy = y.unsqueeze(1).expand(-1, ids.shape[1], *y.shape[1:])[mask]  # each caption's labels at its tail positions
        if kind_only:
            return F.cross_entropy(logits[-1], yy), [(logits[-1].argmax(-1) == yy).float().mean()]
        losses = [F.cross_entropy(lg, yy[:, k]) for k, lg in enumerate(logits)]
        accs = [(lg.argmax(-1) == yy[:, k]).float().mean() for k, lg in enumerate(logits)]
        return sum(losses), accs

    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(len(scenes), size=batch, replace=False))
        loss_s, _ = loss_of(scene_ids[pick], scene_y[pick], kind_only=False)
        loss_o, _ = loss_of(other_ids, other_kind, kind_only=True)
        opt.zero_grad(set_to_none=True)
        (loss_s + loss_o).backward()
        opt.step()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    with torch.no_grad():
        _, accs = loss_of(scene_ids, scene_y, kind_only=False)
        _, kind_acc = loss_of(other_ids, other_kind, kind_only=True)
    names = ("background", "colour", "shape", "layout", "kind")
    return {**{n: round(float(a), 4) for n, a in zip(names, accs)}, "other_kind": round(float(kind_acc[0]), 4)}
