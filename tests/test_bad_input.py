"""Bad documents give one-line errors with exit 2 (schema-validated), also as JSON with --json."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_surgery.engine.stats import load_stats
from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import load_neuron_set
from nemo_surgery.schema import Int, ListOf, Nullable, Obj, SchemaError, Str, validate

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
GOOD_SET = {
    "format": "nemo-surgery.neuron-set",
    "version": 1,
    "model": {"fingerprint": None, "source": "x"},
    "settings": {},
    "prompts": [{"index": 0, "prompt": "a photo", "memorized": True}],
    "layers": [{"id": LAYER, "rows": 64, "cols": 32, "neurons": [7, 3], "needed_by": [[0, 1], [0]]}],
    "total_neurons": 2,
}
DEMO_STATS = Path(__file__).resolve().parents[1] / "nemo_surgery" / "demo" / "assets" / "stats.json"


def _set_doc(change) -> dict:
    doc = copy.deepcopy(GOOD_SET)
    change(doc)
    return doc


BAD_SETS = {
    "model a string": (lambda d: d.__setitem__("model", "sd-1.5"), "model: expected an object"),
    "needed_by an int": (lambda d: d["layers"][0].__setitem__("needed_by", 5), "layers[0].needed_by: expected a list"),
    "needed_by flat": (lambda d: d["layers"][0].__setitem__("needed_by", [0, 0]), "layers[0].needed_by[0]: expected a list"),
    "prompts strings": (lambda d: d.__setitem__("prompts", ["a", "b"]), "prompts[0]: expected an object"),
    "neurons a string": (lambda d: d["layers"][0].__setitem__("neurons", "3,7"), "layers[0].neurons: expected a list"),
    "rows a bool": (lambda d: d["layers"][0].__setitem__("rows", True), "layers[0].rows: expected an integer >= 1"),
    "negative neuron": (lambda d: d["layers"][0].__setitem__("neurons", [-1]), "layers[0].neurons[0]: expected an integer >= 0"),
    "layers missing": (lambda d: d.pop("layers"), "missing required field 'layers'"),
}


def test_good_set_sorts_neurons_with_their_prompts(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps(GOOD_SET))
    ns = load_neuron_set(path)
    assert ns.layers[0].neurons == [3, 7]
    assert ns.layers[0].needed_by == [[0], [0, 1]]  # stays aligned with its neuron


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_bad_neuron_set_fields_are_one_line_input_errors(tmp_path, case):
    change, expected = BAD_SETS[case]
    path = tmp_path / "set.json"
    path.write_text(json.dumps(_set_doc(change)))
    with pytest.raises(InputError) as info:
        load_neuron_set(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_deeply_nested_json_is_an_input_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        load_neuron_set(path)
    with pytest.raises(InputError, match="nested too deeply"):
        load_stats(path)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: [d], "top level is not a JSON object"),
        (lambda d: {**d, "layers": {"a": 1}}, "layers: expected a list"),
        (lambda d: {**d, "model": "x"}, "model: expected an object"),
        (lambda d: {**d, "pairwise": {**d["pairwise"], "mean": "0.5"}}, "pairwise.mean: expected a number"),
    ],
)
def test_bad_statistics_are_one_line_input_errors(tmp_path, change, expected):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(change(json.loads(DEMO_STATS.read_text()))))
    with pytest.raises(InputError, match="recompute it") as info:
        load_stats(path)
    assert expected in str(info.value)


def test_schema_paths_and_nullable():
    schema = Obj(required={"a": ListOf(Obj(required={"b": Int(0)}))}, optional={"c": Nullable(Str())})
    validate({"a": [{"b": 1}], "c": None}, schema)
    with pytest.raises(SchemaError, match=r"a\[1\]\.b: expected an integer >= 0, found the string '2'"):
        validate({"a": [{"b": 1}, {"b": "2"}]}, schema)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_surgery", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_documents_exit_2_with_one_line_and_json_error(tmp_path):
    bad_set = tmp_path / "set.json"
    bad_set.write_text(json.dumps(_set_doc(BAD_SETS["needed_by an int"][0])))
    ckpt = tmp_path / "unet.safetensors"
    ckpt.write_bytes(b"not read: the set is checked first")
    run = _cli("apply", str(ckpt), "--neurons", str(bad_set), "--dry-run", "--json")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    error = json.loads(run.stdout)["error"]
    assert error["exit_code"] == 2 and error["kind"] == "bad_input"
    assert "layers[0].needed_by" in error["message"] and not error["message"].startswith("error")

    deep = tmp_path / "deep.json"
    deep.write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo\n")
    run = _cli("scan", str(prompts), "--stats", str(deep), "--out", str(tmp_path / "n.json"))
    assert run.returncode == 2 and "nested too deeply" in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""  # no --json: nothing on stdout


def test_apply_short_out_option_writes_there(tmp_path):
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main
    from tests.checkpoint_fixtures import DEFAULT_NEURONS, write_ldm_file, write_neuron_set

    src = write_ldm_file(tmp_path / "model.safetensors", "fp16", ema=False)
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    out = tmp_path / "elsewhere.safetensors"
    run = CliRunner().invoke(main, ["apply", str(src), "--neurons", str(ns), "-o", str(out), "-q", "--no-verify"])
    assert run.exit_code == 0, run.output
    assert out.is_file() and not (tmp_path / "model-nemo.safetensors").exists()
