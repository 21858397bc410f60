"""The wheel carries what an installed user needs: the demo's prompt lists, the LICENSE, the demo assets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nemo_surgery.demo.paths import DEMO_PROMPTS_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_prompt_lists_equal_the_top_level_ones():
    top = sorted(p.name for p in (ROOT / "prompts").glob("*.txt"))
    assert top and sorted(p.name for p in DEMO_PROMPTS_DIR.glob("*.txt")) == top
    for name in top:
        assert (DEMO_PROMPTS_DIR / name).read_bytes() == (ROOT / "prompts" / name).read_bytes(), name


@pytest.mark.slow
def test_wheel_contains_prompts_license_and_demo_model(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("nemo_surgery-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("demo_memorized.txt", "demo_holdout.txt", "demo_mixed.txt"):
        assert f"nemo_surgery/demo/assets/prompts/{name}" in names
    assert any(n.endswith("/model/model_index.json") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
