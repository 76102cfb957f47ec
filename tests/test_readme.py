"""README.md stays true: every setting is documented, and the test command is the one CI runs."""

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [f"ZUTIS_{name.upper()}" for name in Settings.model_fields if f"`ZUTIS_{name.upper()}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
    documented = set(re.findall(r"`(ZUTIS_[A-Z_]+)`", readme))
    known = {f"ZUTIS_{n.upper()}" for n in Settings.model_fields}
    assert documented <= known, f"README.md documents unknown settings {sorted(documented - known)}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    assert command in ci.splitlines()


def test_files_the_readme_examples_write_stay_out_of_git(tmp_path):
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    text = (ROOT / "README.md").read_text() + (ROOT / "client" / "README.md").read_text()
    # The pictures and results of the usage examples (not the training commands' checkpoints and reports).
    written = set(re.findall(r"--overlay(?:-dir)? ([^\s\]]+)", text)) | set(re.findall(r"\.save\(\"([^\"]+)\"\)", text))
    written |= {path for path in re.findall(r"--out ([^\s\]]+)", text) if path.startswith("results")}
    assert {"overlay.png", "results.json", "overlays/"} <= written, written
    inside = [path for path in written if not path.startswith("/") and not path.isupper()]  # DIR: a placeholder
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *inside], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(inside), f"written into the checkout, not ignored: {set(inside) - set(ignored)}"
