"""Optional embedding metrics (SSCD copy detection, CLIP prompt alignment) from local model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.verify.metrics import load_clip, load_image, load_sscd


def _mean_offdiag(mat: torch.Tensor) -> float:
    n = mat.shape[0]
    if n < 2:
        return 1.0
    mask = ~torch.eye(n, dtype=torch.bool)
    return float(mat[mask].mean())


def sscd_metrics(path: Path, device: torch.device, prompts: list[Prompt], train: dict[int, Path],
                 before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """SSCD similarity between seeds and to the training image, before and after."""
    metric = load_sscd(path, device)
    h, w = before.shape[2], before.shape[3]
    rows = []
    for k, p in enumerate(prompts):
        eb, ea = metric.embed(before[k]), metric.embed(after[k])
        row = {"index": p.index, "between_seeds_before": _mean_offdiag(eb @ eb.T),
               "between_seeds_after": _mean_offdiag(ea @ ea.T)}
        if p.index in train:
            et = metric.embed(load_image(train[p.index], h, w)[None])
            row["to_train_before"] = (eb @ et.T).flatten().tolist()
            row["to_train_after"] = (ea @ et.T).flatten().tolist()
        rows.append(row)
    return {"model": str(path), "prompts": rows}


def clip_metrics(path: Path, device: torch.device, groups: list[tuple[str, list[Prompt], np.ndarray, np.ndarray]]
                 ) -> dict[str, Any]:
    """CLIP image-text alignment before and after, per group of (name, prompts, before, after)."""
    metric = load_clip(path, device)
    res: dict[str, Any] = {"model": str(path)}
    for name, plist, before, after in groups:
        text = metric.embed_text([p.text for p in plist])
        sb = [float((metric.embed(before[k]) @ text[k]).mean()) for k in range(len(plist))]
        sa = [float((metric.embed(after[k]) @ text[k]).mean()) for k in range(len(plist))]
        res[name] = {"before": float(np.mean(sb)), "after": float(np.mean(sa)), "per_prompt_before": sb,
                     "per_prompt_after": sa}
    return res


def optional_metrics(sscd: Path | None, clip: Path | None, device: torch.device, prompts: list[Prompt],
                     train: dict[int, Path], mem_before: np.ndarray, mem_after: np.ndarray,
                     holdout: list[Prompt], hold_before: np.ndarray | None, hold_after: np.ndarray | None
                     ) -> dict[str, Any]:
    """SSCD and CLIP numbers when their local files are given (checked by precheck); 'skipped' otherwise."""
    out: dict[str, Any] = {}
    if sscd is None:
        out["sscd"] = {"skipped": "no --sscd PATH given (TorchScript SSCD model); copy-detection not measured"}
    else:
        out["sscd"] = sscd_metrics(sscd, device, prompts, train, mem_before, mem_after)
    if clip is None:
        out["clip"] = {"skipped": "no --clip DIR given (local CLIP model folder); prompt alignment not measured"}
    else:
        groups = [("memorized", prompts, mem_before, mem_after)]
        if holdout:
            groups.append(("holdout", holdout, hold_before, hold_after))
        out["clip"] = clip_metrics(clip, device, groups)
    return out
