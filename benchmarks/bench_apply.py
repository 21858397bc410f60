"""Benchmark `apply` on an SD 1.5-shaped single-file checkpoint: time against `cp` + `sync`, peak RSS.

Builds (streamed, bounded memory) a safetensors file of --gib GiB (default 2)
with the 16 real SD 1.x ``attn2.to_v`` keys and shapes in fp16 plus filler
tensors of random values, then measures, in one run, --repeat rounds (default 3)
of, in this order, each on the same warm page cache (the input is read once with
``cat`` before every measurement; dropping caches needs privileges this tool does
not assume, so both sides start warm) and after a ``sync``:

- ``cp`` and ``cp`` + ``sync`` of the file (apply fsyncs its output, cp does not);
- ``nemo-surgery apply --no-verify`` (the CLI: interpreter start-up, plan,
  fingerprint, the copy pass, structural verification, fsync, report, publish),
  and the same with ``--input-sha256`` (the input's SHA-256 too: a second digest);
- ``run_apply`` called from a small Python child (the same work without the CLI's
  imports), with --baseline-rev also ``run_apply`` of an older git revision (its
  package extracted with ``git archive``), the copy pass alone
  (``write_patched_copy``, the output digest only, as apply's default), and ``apply --in-place`` (on a fresh copy of the
  file, made outside the timing).

Children run with Python's bytecode cache on (``PYTHONDONTWRITEBYTECODE`` unset, one warm-up run
first), as an installed package has its ``.pyc`` files. Each child runs under ``/usr/bin/time
-v``; its "Maximum resident set size" is the peak RSS printed (``os.wait4`` where /usr/bin/time
is missing). Times are medians over the rounds, ratios are of medians, and every round runs both
sides under the same machine load.

Usage: python benchmarks/bench_apply.py [--gib 2] [--repeat 3] [--dir /tmp] [--baseline-rev REV] [--nice N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Run cmd; return (seconds, peak RSS in MB, CPU seconds) of that child alone.

    Peak RSS is /usr/bin/time -v's "Maximum resident set size" where it exists,
    else the same figure from ``os.wait4``; CPU seconds are user + system time.
    """
    gnu_time = shutil.which("time", path="/usr/bin")
    report = None
    if gnu_time:
        fd, report = tempfile.mkstemp(prefix="nemo-bench-time-")
        os.close(fd)
        cmd = [gnu_time, "-v", "-o", report, *cmd]
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
        rss_kb = usage.ru_maxrss
        if report is not None:
            text = Path(report).read_text()
            rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    finally:
        if report is not None:
            Path(report).unlink(missing_ok=True)
    return elapsed, rss_kb // 1024, usage.ru_utime + usage.ru_stime


def child(code: str, root: Path = ROOT) -> list[str]:
    """A Python child command running code (with root, the package's source tree, first on sys.path)."""
    paths = [str(root), str(Path(__file__).resolve().parent)]
    return [sys.executable, "-c", f"import sys; sys.path[:0] = {paths!r}; {code}"]


def extract_revision(rev: str, dest: Path) -> Path:
    """Write the nemo_surgery package of git revision rev under dest (git archive: the repository is not touched)."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "nemo_surgery"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def warm(src: Path) -> None:
    """Read src into the page cache and flush dirty data: the same start for every measurement."""
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)
    os.sync()


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    os.sync()


def one_round(src: Path, ns: Path, work: Path, baseline: tuple[str, Path] | None) -> dict[str, tuple[float, int, float]]:
    """Every measurement once, each after warm(); returns name -> (seconds, peak RSS MB, CPU seconds)."""
    out, cp_out = work / "out.safetensors", work / "cp.safetensors"
    reports = [out.with_name(out.name + ".report.json"), out.with_name(out.name + ".report.md")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    got: dict[str, tuple[float, int, float]] = {}
    warm(src)
    got["cp"] = timed(["cp", str(src), str(cp_out)])
    _remove(cp_out)
    warm(src)
    got["cp + sync"] = timed(["sh", "-c", f"cp '{src}' '{cp_out}' && sync"])
    _remove(cp_out)
    warm(src)
    got["apply (CLI, --no-verify)"] = timed(
        [sys.executable, "-m", "nemo_surgery", "apply", str(src), "--neurons", str(ns), "--out", str(out),
         "--no-verify", "--quiet"], env=env)
    _remove(out, *reports)
    warm(src)
    got["apply (CLI, as above, --input-sha256)"] = timed(
        [sys.executable, "-m", "nemo_surgery", "apply", str(src), "--neurons", str(ns), "--out", str(out),
         "--no-verify", "--quiet", "--input-sha256"], env=env)
    _remove(out, *reports)
    warm(src)
    got["run_apply (library call)"] = timed(child(
        "from nemo_surgery.surgery.apply import run_apply;"
        f"r = run_apply({str(src)!r}, {str(ns)!r}, out={str(out)!r}); assert r.ok"
    ))
    _remove(out, *reports)
    if baseline is not None:
        warm(src)
        got[f"run_apply at {baseline[0]}"] = timed(child(
            "from nemo_surgery.surgery.apply import run_apply;"
            f"r = run_apply({str(src)!r}, {str(ns)!r}, out={str(out)!r}); assert r.ok", root=baseline[1]
        ))
        _remove(out, *reports)
    warm(src)
    got["copy pass only (write_patched_copy)"] = timed(child(
        "from pathlib import Path; from nemo_surgery.neuron_set import load_neuron_set;"
        "from nemo_surgery.surgery.discover import discover; from nemo_surgery.surgery.plan import build_plan;"
        "from nemo_surgery.surgery.patch import write_patched_copy;"
        f"p = build_plan(discover({str(src)!r}), load_neuron_set({str(ns)!r}));"
        f"w = write_patched_copy(p.files[0], Path({str(out)!r}), 'x', hash_input=False);"
        "assert w.check.targets_zero and w.check.others_identical"
    ))
    _remove(out)
    victim = work / "inplace.safetensors"
    subprocess.run(["cp", str(src), str(victim)], check=True)
    warm(victim)
    got["apply --in-place (library call)"] = timed(child(
        "from nemo_surgery.surgery.apply import run_apply;"
        f"r = run_apply({str(victim)!r}, {str(ns)!r}, in_place=True); assert r.ok"
    ))
    _remove(victim, victim.with_name(victim.name + ".report.json"), victim.with_name(victim.name + ".report.md"))
    return got


def main() -> None:
    """Build the file, run the rounds, print a table of medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every measurement (default 3); medians printed")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (needs about 3x --gib free)")
    ap.add_argument("--baseline-rev", default=None,
                    help="also time run_apply of this git revision (e.g. HEAD~3), in the same rounds")
    ap.add_argument("--nice", type=int, default=0,
                    help="change this process's niceness by N first, children alike (negative needs root): other jobs' "
                         "load then weighs less on every measured side")
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)
    # An installed package has its bytecode compiled (pip does it at install); with
    # PYTHONDONTWRITEBYTECODE set (as on this project's machines) every child would compile
    # the package's sources again, about 0.08 s of each CLI run. The rounds run with the cache on,
    # after one warm-up that writes it.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "nemo_surgery", "apply", "--help"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    work = Path(tempfile.mkdtemp(prefix="nemo-bench-", dir=args.dir))
    try:
        baseline = (args.baseline_rev, extract_revision(args.baseline_rev, work / "baseline")) if args.baseline_rev else None
        src, ns = work / "sd15.safetensors", work / "set.json"
        # built in a child so this process stays small: a forked child inherits the parent's RSS
        subprocess.run(child(
            "import json, pathlib, bench_apply as b;"
            f"n = b.build_checkpoint(pathlib.Path({str(src)!r}), {args.gib * 2**30 / 1e9});"
            f"pathlib.Path({str(ns)!r}).write_text(json.dumps(b.neuron_set_doc(n)))"
        ), check=True)
        neurons = {layer["id"]: layer["neurons"] for layer in json.loads(ns.read_text())["layers"]}
        rows = sum(len(r) for r in neurons.values())
        rounds = [one_round(src, ns, work, baseline) for _ in range(max(args.repeat, 1))]
        size = src.stat().st_size
        load = os.getloadavg()
        print(f"checkpoint: {size / 2**30:.2f} GiB ({size / 1e9:.2f} GB), {len(neurons)} to_v layers, {rows} rows "
              f"zeroed (fp16); {len(rounds)} round(s), medians; page cache warm for every row; "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} CPUs; niceness {os.nice(0)}")
        med = {name: (statistics.median(r[name][0] for r in rounds), max(r[name][1] for r in rounds),
                      statistics.median(r[name][2] for r in rounds)) for name in rounds[0]}
        t_cp, t_cp_sync = med["cp"][0], med["cp + sync"][0]
        print(f"{'measure':<38}{'seconds':>9}{'x cp':>7}{'x cp+sync':>11}{'GiB/s':>7}{'CPU s':>7}{'peak RSS MB':>13}"
              "  all rounds (s)")
        for name, (t, rss, cpu) in med.items():
            every = " ".join(f"{r[name][0]:.2f}" for r in rounds)
            print(f"{name:<38}{t:>9.2f}{t / t_cp:>7.2f}{t / t_cp_sync:>11.2f}{size / 2**30 / t:>7.2f}{cpu:>7.2f}"
                  f"{rss:>13}  {every}")
        print("CPU s: user + system seconds of the child (median); peak RSS: the largest over the rounds")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
