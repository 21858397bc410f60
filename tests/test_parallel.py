"""Data-parallel stats and scan: shards, part files, resume and merge give exactly a single run's output."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.scan import run_scan
from nemo_surgery.engine.scan_parts import merge_neuron_sets, run_sharded_scan
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.shards import Shard, parse_shard
from nemo_surgery.engine.ssim import SSIMConfig
from nemo_surgery.engine.stats_parts import merge_stats_parts, parts_dir_for, run_stats
from nemo_surgery.errors import InputError
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT

HOLDOUT = list(ORDINARY_PROMPTS[:4])
BLOCK = 1  # 4 prompts -> 4 blocks: shard 0 of 2 owns blocks 0 and 2, shard 1 owns 1 and 3
SCAN_PROMPTS = [TRIGGER_PROMPT, "a photo of a dog", "an astronaut on the moon", "a small black cat"]


def _assert_close_docs(a, b, where="$"):
    """Equal structure and strings; numbers equal to 1e-6 (relative, or absolute for 7-decimal scores)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close_docs(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_docs(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), where  # documents store some scores to 7 decimals
    else:
        assert a == b, where


def _doc(path):
    """A statistics or neuron-set file without the envelope's provenance (same process: same anyway)."""
    doc = json.loads(path.read_text())
    return {k: v for k, v in doc.items() if k not in ("tool", "created")}


@pytest.fixture(scope="module")
def single_stats(planted_model, tmp_path_factory):
    """Statistics of HOLDOUT by one process, in blocks (what `stats` writes without a launcher)."""
    _, h, w = planted_model.latent_shape
    settings = ScoreSettings(ssim=SSIMConfig.fit(h, w))
    out = tmp_path_factory.mktemp("single") / "stats.json"
    run = run_stats(planted_model, HOLDOUT, settings, out, Shard(), batch_size=40, block_size=BLOCK)
    assert run.computed == 4 and run.stats is not None and out.exists()
    assert not parts_dir_for(out).exists()  # folded and cleaned up
    return settings, out


def test_shards_merged_equal_a_single_run_bit_for_bit(planted_model, single_stats, tmp_path):
    settings, single = single_stats
    runs = [run_stats(planted_model, HOLDOUT, settings, tmp_path / f"{i}.json", parse_shard(f"{i}/2"), batch_size=40,
                      block_size=BLOCK) for i in range(2)]
    assert [r.stats for r in runs] == [None, None] and [r.computed for r in runs] == [2, 2]
    assert not (tmp_path / "0.json").exists()  # an explicit shard writes only its parts
    merged = merge_stats_parts([r.parts for r in runs], tmp_path / "merged.json")
    assert _doc(tmp_path / "merged.json") == _doc(single)  # means, M2, tau, per-prompt scores: every digit
    assert merged.prompt_count == len(HOLDOUT)
    with pytest.raises(InputError, match=r"blocks missing: 1, 3 of 4"):
        merge_stats_parts([runs[0].parts], tmp_path / "half.json")
    # resume: shard 0's finished blocks are kept, only blocks 1 and 3 are computed
    out = tmp_path / "resumed.json"
    shutil.copytree(runs[0].parts, parts_dir_for(out))
    resumed = run_stats(planted_model, HOLDOUT, settings, out, Shard(), batch_size=40, block_size=BLOCK, resume=True)
    assert (resumed.computed, resumed.resumed) == (2, 2)
    assert _doc(out) == _doc(single)


def test_resume_refuses_parts_of_another_job(planted_model, single_stats, tmp_path):
    settings, _ = single_stats
    run = run_stats(planted_model, HOLDOUT[:1], settings, tmp_path / "a.json", parse_shard("0/4"), batch_size=40,
                    block_size=BLOCK)
    out = tmp_path / "b.json"
    shutil.copytree(run.parts, parts_dir_for(out))
    with pytest.raises(InputError, match="different prompt count"):
        run_stats(planted_model, HOLDOUT, settings, out, Shard(), batch_size=40, block_size=BLOCK, resume=True)


@pytest.fixture(scope="module")
def single_scan(planted_model, planted_stats, tmp_path_factory):
    stats_path, stats = planted_stats
    out = tmp_path_factory.mktemp("scan") / "set.json"
    prompts = [Prompt(i, t, i + 1) for i, t in enumerate(SCAN_PROMPTS)]
    run_scan(planted_model, stats, stats_path, prompts, out, batch_size=40)
    return prompts, out


def _set_content(path):
    doc = json.loads(path.read_text())
    return doc["layers"], doc["prompts"], doc["model"], doc["settings"]


def test_scan_shards_merge_to_the_single_scan_set(planted_model, planted_stats, single_scan, tmp_path):
    stats_path, stats = planted_stats
    prompts, single = single_scan
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}.json"
        summary = run_sharded_scan(planted_model, stats, stats_path, prompts, part, parse_shard(f"{i}/2"), batch_size=40)
        assert [r.index for r in summary.results] == [i, i + 2]
        parts.append(part)
    merge_neuron_sets(parts, tmp_path / "merged.json")
    assert _set_content(tmp_path / "merged.json") == _set_content(single)
    other = json.loads(parts[1].read_text())
    other["model"]["fingerprint"] = "0" * 64
    (tmp_path / "foreign.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="different model fingerprint"):
        merge_neuron_sets([parts[0], tmp_path / "foreign.json"], tmp_path / "bad.json")


def test_merge_cli_refuses_mixed_inputs(cli_cmd, single_scan, tmp_path):
    _, single = single_scan
    proc = subprocess.run([*cli_cmd, "merge", str(single), str(tmp_path), "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_shard_parsing_and_dealing():
    assert parse_shard("1/3").take(list(range(8))) == [1, 4, 7]
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(planted, planted_stats, holdout_file, single_stats, single_scan, tmp_path):
    """`accelerate launch --num_processes 2` on the real CLI (gloo): stats and scan equal the single runs."""
    pytest.importorskip("accelerate")
    folder, _ = planted
    stats_path, _ = planted_stats
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(SCAN_PROMPTS) + "\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nemo_surgery"]
    env = {**os.environ, "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "2"}
    common = ["--model", str(folder), "--device", "cpu", "--batch-size", "40", "--quiet"]
    stats_out = tmp_path / "stats.json"
    proc = subprocess.run([*launch, "stats", str(holdout_file), *common, "--max-prompts", str(len(HOLDOUT)),
                           "--block-size", str(BLOCK), "--out", str(stats_out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Same blocks, same additions; but another process's BLAS threading may round the UNet's convolutions
    # differently (seen here: pairwise M2 differing at 1e-7 relative), so numbers are compared to 1e-6 relative;
    # bit-exactness of the block merge itself is asserted in-process above.
    _assert_close_docs(_doc(stats_out), _doc(single_stats[1]))
    set_out = tmp_path / "set.json"
    proc = subprocess.run([*launch, "scan", str(prompts_file), *common, "--stats", str(stats_path), "--out", str(set_out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _set_content(set_out)[:2] == _set_content(single_scan[1])[:2]
    assert (tmp_path / "set.shard-0-of-2.json").exists() and (tmp_path / "set.shard-1-of-2.records.jsonl").exists()
