"""Helpers for the tests that start real processes (the service, Prometheus, nginx). The process helpers the
benchmarks share (a free port, the service's environment, starting and stopping it) live in
``benchmarks.fixtures`` and are reused here; what is test-specific (``wait_for`` failing with an assertion and
the log's tail) stays."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.fixtures import free_port


def tail(log: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, process: subprocess.Popen | None = None,
             log: Path | None = None, ignore: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)) -> Any:
    """Poll ``check`` until it returns a truthy value (exceptions in ``ignore`` count as not yet) and return it;
    fail after ``timeout_s`` or as soon as ``process`` exits, with the end of ``log``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except ignore:
            pass
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{tail(log)}")
        time.sleep(0.1)


__all__ = ["free_port", "tail", "wait_for"]
