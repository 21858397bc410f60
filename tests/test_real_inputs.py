"""Real user inputs: single-file (LDM) checkpoints with --config, offline hub ids (local_files_only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from nemo_surgery.engine.model import load_model
from nemo_surgery.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(pipeline, pipeline folder, LDM single file, config folder without weights) of one tiny SD model."""
    from tests.models.single_file import write_config_folder, write_single_file
    from tests.models.tiny import build_pipeline, save_pipeline

    base = tmp_path_factory.mktemp("single")
    pipe = build_pipeline()
    folder = save_pipeline(pipe, base / "pipe")
    ckpt = write_single_file(pipe, base / "model.safetensors")
    return pipe, folder, ckpt, write_config_folder(folder, base / "config")


def test_single_file_with_config_loads_the_same_model(single_file):
    pipe, folder, ckpt, config = single_file
    loaded = load_model(ckpt, device="cpu", config=config, with_vae=True)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, part).state_dict(), getattr(loaded.pipe, part).state_dict()
        assert want.keys() == got.keys()
        for key, value in want.items():
            assert torch.equal(value, got[key].reshape(value.shape)), f"{part}.{key}"
    # the same detection numbers as the diffusers folder of the same weights
    from nemo_surgery.engine.score import Scorer, ScoreSettings

    ref = load_model(folder, device="cpu")
    cond_a, cond_b = ref.encode(["a photo of a dog"]), loaded.encode(["a photo of a dog"])
    a = Scorer(ref, ref.layers, ScoreSettings(seeds=2)).noise_differences(cond_a)
    b = Scorer(loaded, loaded.layers, ScoreSettings(seeds=2)).noise_differences(cond_b)
    torch.testing.assert_close(a, b)


def test_single_file_without_config_names_both_remedies(single_file, tmp_path, monkeypatch):
    _, _, ckpt, _ = single_file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError) as info:
        load_model(ckpt, device="cpu")
    message = str(info.value)
    assert "--config" in message and "cache" in message and "\n" not in message


def test_single_file_refusals(single_file, tmp_path):
    _, folder, ckpt, config = single_file
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(InputError, match="pickle checkpoints are refused"):
        load_model(pickle, device="cpu")
    with pytest.raises(InputError, match="only used with a single-file"):
        load_model(folder, device="cpu", config=config)
    with pytest.raises(InputError, match="model_index.json"):
        load_model(ckpt, device="cpu", config=tmp_path)


def test_cli_stats_on_a_single_file(single_file, tmp_path):
    _, _, ckpt, config = single_file
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("a photo of a dog\na red circle\n")
    out = tmp_path / "stats.json"
    run = subprocess.run(
        [sys.executable, "-m", "nemo_surgery", "stats", str(holdout), "--model", str(ckpt), "--config", str(config),
         "--out", str(out), "--seeds", "2", "--device", "cpu", "--json", "-q"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["model"]["source"] == str(ckpt)


class _RecordingServer:
    """A loopback HTTP endpoint that records each request line and answers nothing (stands for the hub)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(1000).split(b"\r\n")[0].decode(errors="replace"))
            except OSError:
                self.requests.append("?")
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_hub_id_is_read_from_the_cache_without_network(single_file, tmp_path):
    """A hub id in the local cache loads with the hub unreachable, and the model is never asked for there.

    (huggingface_hub itself may fetch its agent-harness registry once a day when an AI-agent
    environment variable is set; that request is not about the model and is not counted.)
    """
    import shutil

    _, folder, _, _ = single_file
    cache = tmp_path / "hub"
    revision = "0" * 40
    repo = cache / "models--nemo-test--tiny-sd"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    server = _RecordingServer()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=server.url, HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    code = ("from nemo_surgery.engine.model import load_model; "
            "m = load_model('nemo-test/tiny-sd', device='cpu'); print(len(m.layers))")
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    finally:
        server.close()
    assert run.returncode == 0, run.stderr[-2000:]
    from nemo_surgery.engine.layers import discover_value_layers

    assert run.stdout.strip() == str(len(discover_value_layers(single_file[0].unet)))
    about_model = [r for r in server.requests if "tiny-sd" in r or "/api/models" in r or r == "?"]
    assert not about_model, about_model
