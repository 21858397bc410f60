"""Benchmark `apply` on an SD 1.5-sized single-file checkpoint: time vs `cp`, in-place time, peak RSS.

Builds (streamed, bounded memory) a safetensors file of about --gb GB with the
16 real SD 1.x ``attn2.to_v`` keys and shapes in fp16 plus filler tensors of
random values, then measures in one run:

- ``cp`` and ``cp`` + ``sync`` of the file (apply fsyncs its output, cp does not);
- apply (copy mode, including the always-on structural verification), its patch
  phase alone, and apply --in-place, each in a child process whose peak RSS is
  read with ``os.wait4``.

Usage: python benchmarks/bench_apply.py [--gb 2.5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_surgery.keymap import SD_LAYERS_PER_BLOCK, diffusers_to_ldm, ldm_weight_key  # noqa: E402

SD1_ROWS = {
    "down_blocks.0.attentions.0": 320, "down_blocks.0.attentions.1": 320,
    "down_blocks.1.attentions.0": 640, "down_blocks.1.attentions.1": 640,
    "down_blocks.2.attentions.0": 1280, "down_blocks.2.attentions.1": 1280,
    "mid_block.attentions.0": 1280,
    "up_blocks.1.attentions.0": 1280, "up_blocks.1.attentions.1": 1280, "up_blocks.1.attentions.2": 1280,
    "up_blocks.2.attentions.0": 640, "up_blocks.2.attentions.1": 640, "up_blocks.2.attentions.2": 640,
    "up_blocks.3.attentions.0": 320, "up_blocks.3.attentions.1": 320, "up_blocks.3.attentions.2": 320,
}
POOL = 64 << 20


def build_checkpoint(path: Path, gb: float) -> dict[str, list[int]]:
    """Write the benchmark file; return the neuron choice (layer id -> rows)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pool = rng.standard_normal(POOL // 2, dtype=np.float32).astype(np.float16).tobytes()
    tensors: list[tuple[str, list[int]]] = []
    neurons: dict[str, list[int]] = {}
    for prefix, rows in SD1_ROWS.items():
        lid = f"{prefix}.transformer_blocks.0.attn2.to_v"
        tensors.append((ldm_weight_key(diffusers_to_ldm(lid, SD_LAYERS_PER_BLOCK)), [rows, 768]))
        neurons[lid] = sorted({int(r) for r in rng.choice(rows, size=rows // 20, replace=False)} | {0, 1, 2})
    size = sum(r * c * 2 for _, (r, c) in tensors)
    i = 0
    while size < gb * 1e9:
        tensors.append((f"model.diffusion_model.output_blocks.{i}.0.filler.weight", [1280, 5120]))
        size += 1280 * 5120 * 2
        i += 1
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = shape[0] * shape[1] * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as fh:
        fh.write(len(body).to_bytes(8, "little") + body)
        pos = 0
        while pos < offset:
            n = min(POOL, offset - pos)
            start = (pos * 7919) % (POOL - n + 1) if n < POOL else 0
            fh.write(pool[start:start + n])
            pos += n
    return neurons


def neuron_set_doc(neurons: dict[str, list[int]]) -> dict:
    """The version-1 neuron-set document for the benchmark's choice."""
    return {"format": "nemo-surgery.neuron-set", "version": 1, "layers": [
        {"id": lid, "rows": SD1_ROWS[lid.split(".transformer")[0]], "cols": 768, "neurons": rows}
        for lid, rows in neurons.items()]}


def timed(cmd: list[str]) -> tuple[float, int]:
    """Run cmd; return (seconds, peak RSS in MB) of that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss // 1024


def child(code: str) -> list[str]:
    """A Python child command running code (with the repo on sys.path)."""
    here = Path(__file__).resolve().parent
    paths = [str(here.parent), str(here)]
    return [sys.executable, "-c", f"import sys; sys.path[:0] = {paths!r}; {code}"]


def main() -> None:
    """Build the file, run every measurement once, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nemo-bench-", dir=args.dir))
    try:
        src, ns = work / "sd15.safetensors", work / "set.json"
        # built in a child so this process stays small: a forked child inherits the parent's RSS
        subprocess.run(child(
            "import json, pathlib, bench_apply as b;"
            f"n = b.build_checkpoint(pathlib.Path({str(src)!r}), {args.gb});"
            f"pathlib.Path({str(ns)!r}).write_text(json.dumps(b.neuron_set_doc(n)))"
        ), check=True)
        neurons = {layer["id"]: layer["neurons"] for layer in json.loads(ns.read_text())["layers"]}
        gb = src.stat().st_size / 1e9
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # same cache state for all
        os.sync()

        t_cp, _ = timed(["cp", str(src), str(work / "cp.safetensors")])
        os.sync()
        (work / "cp.safetensors").unlink()
        os.sync()
        t_cp_sync, _ = timed(["sh", "-c", f"cp '{src}' '{work}/cp.safetensors' && sync"])
        (work / "cp.safetensors").unlink()
        os.sync()

        t_patch, rss_patch = timed(child(
            "from pathlib import Path; from nemo_surgery.neuron_set import load_neuron_set;"
            "from nemo_surgery.surgery.discover import discover; from nemo_surgery.surgery.plan import build_plan;"
            "from nemo_surgery.surgery.patch import write_patched_copy;"
            f"p = build_plan(discover({str(src)!r}), load_neuron_set({str(ns)!r}));"
            f"write_patched_copy(p.files[0], Path({str(work / 'patch.safetensors')!r}), 'x')"
        ))
        (work / "patch.safetensors").unlink()
        os.sync()

        out = work / "out.safetensors"
        t_apply, rss_apply = timed(child(
            "from nemo_surgery.surgery.apply import run_apply;"
            f"r = run_apply({str(src)!r}, {str(ns)!r}, out={str(out)!r}); assert r.ok"
        ))
        rows = json.loads(Path(str(out) + ".report.json").read_text())["rows_zeroed"]
        out.unlink()
        os.sync()

        t_inplace, rss_inplace = timed(child(
            "from nemo_surgery.surgery.apply import run_apply;"
            f"r = run_apply({str(src)!r}, {str(ns)!r}, in_place=True); assert r.ok"
        ))

        print(f"checkpoint: {gb:.2f} GB, {len(neurons)} to_v layers, {rows} rows zeroed (fp16)")
        print(f"{'measure':<44}{'seconds':>9}{'x cp':>8}{'x cp+sync':>11}{'peak RSS MB':>13}")
        for name, t, rss in [
            ("cp", t_cp, None),
            ("cp + sync", t_cp_sync, None),
            ("apply: patch phase only (copy+zero+fsync)", t_patch, rss_patch),
            ("apply (patch + structural verification)", t_apply, rss_apply),
            ("apply --in-place (pre-scan+zero+verify)", t_inplace, rss_inplace),
        ]:
            print(f"{name:<44}{t:>9.2f}{t / t_cp:>8.2f}{t / t_cp_sync:>11.2f}{'' if rss is None else rss:>13}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
