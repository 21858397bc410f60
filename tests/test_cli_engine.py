"""The real CLI, run as a subprocess: stats -> scan on the planted pipeline, and bad input."""

import json
import subprocess

import pytest
from click.testing import CliRunner

from nemo_surgery.cli.main import main
from tests.models.plant import TRIGGER_PROMPT


def test_stats_then_scan_end_to_end(planted, holdout_file, tmp_path, cli_cmd):
    def _run(*args):
        return subprocess.run(cli_cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300)

    folder, plant = planted
    stats = tmp_path / "stats.json"
    proc = _run("stats", holdout_file, "--model", folder, "--out", stats, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompts"] == 16
    prompts = tmp_path / "prompts.txt"
    long_prompt = "a photo of a dog " + "on a red house " * 30
    prompts.write_text(f"{TRIGGER_PROMPT}\n# comment\na small black cat\n{long_prompt}\n", encoding="utf-8")
    out = tmp_path / "set.json"
    proc = _run("scan", prompts, "--model", folder, "--stats", stats, "--out", out, "--json", "--batch-size", "40")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["prompts"], summary["memorized"], summary["mitigated"]) == (3, 1, 1)
    assert summary["truncated"] == [2]
    assert "truncated" in proc.stderr and "NOT mitigated" not in proc.stderr
    doc = json.loads(out.read_text())
    mid = next(layer for layer in doc["layers"] if layer["id"] == plant.layer_id)
    assert set(plant.rows) <= set(mid["neurons"])
    # rerunning without --resume/--force refuses with one line and exit 2
    proc = _run("scan", prompts, "--model", folder, "--stats", stats, "--out", out)
    assert proc.returncode == 2 and "pass --force" in proc.stderr
    expected = f"error: {out}: exists; pass --force to overwrite it or --resume to continue its scan"
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [expected]


@pytest.mark.parametrize(
    "args,message",
    [
        (["scan", "{missing}", "--model", "{model}", "--stats", "{stats}"], "prompt file not found"),
        (["scan", "{empty}", "--model", "{model}", "--stats", "{stats}"], "no prompts found"),
        (["scan", "{latin1}", "--model", "{model}", "--stats", "{stats}"], "not valid UTF-8"),
        (["scan", "{good}", "--model", "{model}/unet", "--stats", "{stats}"], "not a diffusers pipeline folder"),
        (["scan", "{good}", "--model", "{model}", "--stats", "{stats}", "--layers", "up_blocks.7"], "unknown value layer"),
        (["scan", "{good}", "--model", "{model}", "--stats", "{missing}"], "statistics file not found"),
        (["scan", "{good}", "--model", "{model}"], "--stats is required with --model"),
        (["scan", "{good}", "--model", "{model}", "--stats", "{foreign}"], "computed on another model"),
        (["stats", "{good}", "--model", "{model}", "--out", "{tmp}/s.json"], "at least 2 hold-out prompts"),
        (["scan", "{good}", "--model", "{model}", "--stats", "{stats}", "--device", "cuda"], "CUDA is not available"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(planted, planted_stats, tmp_path, args, message):
    folder, _ = planted
    stats_path, _ = planted_stats
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "good.txt").write_text("a photo of a dog\n")
    foreign = json.loads(stats_path.read_text())
    foreign["model"]["fingerprint"] = "f" * 64
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    values = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "latin1": tmp_path / "latin1.txt",
              "good": tmp_path / "good.txt", "model": folder, "stats": stats_path, "tmp": tmp_path,
              "foreign": tmp_path / "foreign.json"}
    result = CliRunner().invoke(main, [a.format(**values) for a in args] + ["--out", str(tmp_path / "o.json")]
                                if args[0] == "scan" else [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "o.json").exists()


def test_out_of_memory_is_one_line_and_other_errors_propagate():
    import click

    from nemo_surgery.cli.common import run_command

    @click.command()
    @click.argument("message")
    @run_command
    def fail(message):
        raise RuntimeError(message)

    oom = CliRunner().invoke(fail, ["CUDA out of memory. Tried to allocate 2.00 GiB"])
    assert oom.exit_code == 1 and oom.output.strip().startswith("error: out of memory; lower --batch-size")
    other = CliRunner().invoke(fail, ["shape mismatch"])
    assert isinstance(other.exception, RuntimeError) and "shape mismatch" in str(other.exception)
