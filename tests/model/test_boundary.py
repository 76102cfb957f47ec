"""The line between the inference library and training: ``model`` outside ``model/training`` never imports the
training package (nor the service), and the service with the CLI loads none of it (nor its extra dependencies)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = REPO_ROOT / "model"

# The training commands keep their names (python -m model.train, ...) as entry points in ``model``; they are part of
# training, and the Docker image leaves them out with the package (.dockerignore).
TRAINING_ENTRY_POINTS = {"train.py", "evaluate.py", "index.py", "retrieve.py", "pseudo_mask.py",
                         "shapes/__init__.py", "shapes/clip_pretrain.py"}
# The one command of the library that prints the service's JSON answer reuses the service's schema.
MAY_IMPORT_SERVICE_SCHEMA = {"predict.py"}


def library_modules() -> list[Path]:
    """Every ``.py`` file of the inference library: ``model`` minus the training package and its entry points."""
    files = []
    for path in sorted(MODEL.rglob("*.py")):
        relative = path.relative_to(MODEL).as_posix()
        if relative.startswith("training/") or relative in TRAINING_ENTRY_POINTS:
            continue
        files.append(path)
    return files


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement of ``path`` names, at any depth (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_is_the_expected_set_of_modules():
    relative = {p.relative_to(MODEL).as_posix() for p in library_modules()}
    for module in ("network.py", "predictor.py", "checkpoint.py", "postprocess.py", "convert_official.py"):
        assert module in relative
    assert not any(name.startswith("training") for name in relative)


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: p.relative_to(MODEL).as_posix())
def test_library_module_never_imports_training_or_the_service(path):
    imports = imported_modules(path)
    assert not {m for m in imports if m == "model.training" or m.startswith("model.training.")}, path
    service = {m for m in imports if m == "service" or m.startswith("service.")}
    if path.relative_to(MODEL).as_posix() in MAY_IMPORT_SERVICE_SCHEMA:
        service = {m for m in service if not m.startswith("service.schema")}
    assert not service, f"{path} imports {sorted(service)}"


@pytest.mark.parametrize("entry", sorted(TRAINING_ENTRY_POINTS - {"shapes/__init__.py"}))
def test_training_entry_points_are_thin(entry):
    path = MODEL / entry
    source = path.read_text(encoding="utf-8")
    if entry == "train.py":  # the training script itself (the README's entry point): it reads top to bottom
        assert "from model.training." in source
        return
    tree = ast.parse(source)
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert not defs, f"{entry} should only import its command's main from model.training"
    assert any(m.startswith("model.training.") for m in imported_modules(path))


@pytest.mark.slow  # a fresh interpreter imports torch and open_clip
def test_serving_loads_no_training_code_and_no_training_dependency():
    # A fresh interpreter imports what the service and the CLI import, then reports what got loaded.
    code = ("import json, sys\n"
            "import service.app, service.engine, model.predictor, model.predict, model.convert_official\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('model', 'scipy')))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                         check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "model.predictor" in loaded
    assert not [m for m in loaded if m.startswith("model.training")], loaded
    assert not [m for m in loaded if m.startswith("scipy")], "scipy is a training-only dependency"
