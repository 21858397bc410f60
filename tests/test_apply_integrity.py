"""apply's integrity promises (issue 13): truthful modelspec hash in place, cp-like file modes, no shared inodes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from nemo_surgery.atomic import write_json
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.surgery.safetensors_file import read_header
from tests.checkpoint_fixtures import DEFAULT_NEURONS, assert_patched, expected_zeroed, write_ldm_file, write_neuron_set


def _data_sha(path: Path) -> str:
    h = read_header(path)
    with open(path, "rb") as fh:
        fh.seek(h.data_start)
        return hashlib.sha256(fh.read()).hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    return read_header(path).metadata or {}


def test_in_place_rewrites_a_full_length_modelspec_hash(tmp_path: Path) -> None:
    stale = "0x" + "ab" * 32
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16", metadata={"modelspec.hash_sha256": stale})
    original = (tmp_path / "orig.safetensors")
    original.write_bytes(src.read_bytes())
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns, in_place=True)
    assert result.ok
    meta = _metadata(src)
    assert meta["modelspec.hash_sha256"] == "0x" + _data_sha(src), "the hash now describes the patched data"
    assert read_header(src).header_len == read_header(original).header_len
    assert_patched(original, src, expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))
    report = json.loads((tmp_path / "m.safetensors.report.json").read_text())
    f = report["files"][0]
    assert f["modelspec_hash_updated"] is True and f["metadata_updated"] is False
    assert any("modelspec.hash_sha256 rewritten in place" in n for n in report["notes"])
    assert any(c["name"] == "modelspec.hash_sha256 matches data buffer" and c["ok"] for c in f["checks"])


def test_in_place_says_when_the_modelspec_hash_is_left_stale(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16", metadata={"modelspec.hash_sha256": "0x00"})
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    run_apply(src, ns, in_place=True)
    assert _metadata(src)["modelspec.hash_sha256"] == "0x00"
    report = json.loads((tmp_path / "m.safetensors.report.json").read_text())
    assert report["files"][0]["modelspec_hash_updated"] is False
    assert any("modelspec.hash_sha256 NOT updated: it is stale" in n for n in report["notes"])
    assert not any("refreshed" in n for n in report["notes"]), "no note may claim a refresh that did not happen"


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_respect_the_umask_like_cp(tmp_path: Path, umask_027: None) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16")
    os.chmod(src, 0o664)
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns)
    assert _mode(result.output) == 0o640, "cp gives the source's mode less the umask"
    assert _mode(result.report_json) == 0o640 and _mode(result.report_md) == 0o640
    doc = write_json(tmp_path / "neurons.json", {"a": 1})
    assert _mode(doc) == 0o640, "documents written through atomic.py were 0600"
    os.chmod(doc, 0o604)
    write_json(doc, {"a": 2})
    assert _mode(doc) == 0o604, "replacing a file keeps its mode, as a shell redirection does"


def test_run_apply_takes_an_already_parsed_set(tmp_path: Path) -> None:
    from nemo_surgery.neuron_set import load_neuron_set
    from nemo_surgery.provenance import sha256_file
    from tests.checkpoint_fixtures import REAL_LAYER

    src = write_ldm_file(tmp_path / "m.safetensors", "fp16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    parsed = load_neuron_set(ns)
    parsed.layers = [layer for layer in parsed.layers if layer.id == REAL_LAYER]  # the object, not the file, is applied
    result = run_apply(src, ns, neuron_set=parsed)
    assert result.rows_zeroed == 2 * len(DEFAULT_NEURONS[REAL_LAYER])  # the value weight and its EMA copy
    assert result.to_json()["neuron_set"] == {"path": str(ns), "sha256": sha256_file(ns)}
    assert run_apply(src, ns, out=tmp_path / "b.safetensors").rows_zeroed == 22  # the path-only call still works


def test_no_assert_statements_in_surgery() -> None:
    """Runtime checks must survive `python -O` (issue 8: patch.py relied on an assert)."""
    import ast

    import nemo_surgery.surgery as surgery

    found = []
    for path in Path(surgery.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{path.name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert found == []


def test_in_place_sweeps_report_temps_of_a_killed_run(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    stale = [tmp_path / ".m.safetensors.report.json.nemo-tmp-4242-abcd.tmp", tmp_path / ".m.safetensors.nemo-tmp-4242-ef.journal"]
    for path in stale:
        path.write_text("left by kill -9")
    run_apply(src, ns, in_place=True)
    assert not any(p.exists() for p in stale)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.safetensors", "m.safetensors.report.json", "m.safetensors.report.md", "set.json"]
