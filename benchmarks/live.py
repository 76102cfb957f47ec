"""A service process for the benchmarks that drive one: a free port, waiting for readiness, memory, stopping."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen | None, timeout_s: float, log_path: Path | None = None,
               poll_s: float = 0.5) -> None:
    """Return once ``url``'s ``/readyz`` answers 200; ``SystemExit`` (with the end of ``log_path``) if ``process``
    exits first, or after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path is not None and log_path.exists() else ""
            raise SystemExit(f"the service exited with {process.returncode}" + (f":\n{tail}" if tail else ""))
        if time.monotonic() > end:
            raise SystemExit(f"the service was not ready within {timeout_s:.0f} s")
        time.sleep(poll_s)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``); NaN when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stop(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (the service drains), then SIGKILL if it has not exited within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()


__all__ = ["free_port", "wait_ready", "rss_mb", "stop"]
