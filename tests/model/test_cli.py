"""``python -m`` stage commands: bad input gives one readable line and status 1, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from model.training.command import run_main

ROOT = Path(__file__).parents[2]


def test_run_main_turns_bad_input_into_one_line_and_passes_statuses_through():
    def missing() -> int:
        raise FileNotFoundError("clip file not found: x.safetensors")

    with pytest.raises(SystemExit) as exit_info:
        run_main(missing)
    assert exit_info.value.code == "error: clip file not found: x.safetensors"  # printed to stderr, status 1
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: 3)
    assert exit_info.value.code == 3
    with pytest.raises(KeyError):  # a bug still shows its traceback
        run_main(lambda: {}["x"])


@pytest.mark.parametrize("module,args", [
    ("model.evaluate", ["--checkpoint", "missing.safetensors", "--images", "nowhere", "--coco", "missing.json"]),
    ("model.retrieve", ["--index", "no-such-index", "--concepts", "cat", "--out", "unused.json", "--clip", "x.pt"]),
])
def test_stage_commands_report_a_missing_input_in_one_line(module, args, tmp_path):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
