"""The content-addressed stage cache: where a stage's output lives, when it counts as finished, and how it is built
or awaited.

A stage's output lives in ``cache_dir/<name>-<key>/`` where ``key`` (``stage_key``) hashes a JSON description of
everything the output depends on: the stage's parameters, fingerprints of its input files, and the keys of the
stages it reads. A directory with a ``DONE`` marker is reused as it is; otherwise the stage is built into a
temporary directory that is renamed into place only when complete, so an interrupted build is never mistaken for
a finished one. Under torchrun, rank 0 builds and the other ranks wait for the marker (``run_or_wait_for_stage``).

When what a stage is keyed on changes but its output does not (its key used to hold something the stage never
read), the caller passes the old descriptions as ``legacy``: a finished directory under an old key is then adopted
(renamed to the new key, its ``inputs.json`` rewritten, the old name kept in ``adopted_from``) instead of rebuilt.

This module knows nothing about what the stages are: ``model.training.stages`` (the data and world stages) and
``model.training.config`` (the oracle scene stages) use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DONE = "DONE"


def stage_key(inputs: dict[str, Any]) -> str:
    """A short content key (16 hex digits) of a JSON-serialisable description of a stage's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(cache_dir: str | Path, name: str, inputs: dict[str, Any]) -> Path:
    """The output directory of stage ``name`` for ``inputs``: ``cache_dir/<name>-<stage_key(inputs)>``."""
    return Path(cache_dir) / f"{name}-{stage_key(inputs)}"


def is_done(directory: Path) -> bool:
    """Whether ``directory`` holds a finished stage (its ``DONE`` marker exists)."""
    return (directory / DONE).is_file()


def run_stage(cache_dir: str | Path, name: str, inputs: dict[str, Any], build: Callable[[Path], None],
              log: Callable[[str], None] = print, legacy: Sequence[dict[str, Any]] = ()) -> Path:
    """Return the finished output directory of stage ``name`` for ``inputs``, building it with ``build(tmp_dir)``
    only when no finished one exists (under this key, or under one of the ``legacy`` descriptions of the same
    output, which is adopted). ``inputs.json`` records what the key was computed from."""
    final = stage_dir(cache_dir, name, inputs)
    if is_done(final):
        log(f"stage {name}: cached at {final}")
        return final
    for old_inputs in legacy:
        old = stage_dir(cache_dir, name, old_inputs)
        if old != final and is_done(old):
            if final.exists():  # a stale, unfinished directory
                shutil.rmtree(final)
            old.rename(final)
            (final / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
            (final / "adopted_from").write_text(f"{old.name}\n")
            log(f"stage {name}: cached at {final} (adopted from {old.name}, built under an older key)")
            return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"stage {name}: building {final}")
    start = time.monotonic()
    build(tmp)
    (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
    (tmp / DONE).write_text(f"{time.monotonic() - start:.1f} s\n")
    if final.exists():  # a stale, unfinished directory from an older layout
        shutil.rmtree(final)
    tmp.rename(final)
    log(f"stage {name}: done in {time.monotonic() - start:.1f} s")
    return final


def wait_for_stage(cache_dir: str | Path, name: str, inputs: dict[str, Any], poll_seconds: float = 10.0,
                   timeout_seconds: float | None = None) -> Path:
    """Block until another process (rank 0) has finished the stage; used by the other ranks under torchrun, which
    poll the file system rather than sit in a collective that would time out during an hours-long stage."""
    final = stage_dir(cache_dir, name, inputs)
    start = time.monotonic()
    while not is_done(final):
        if timeout_seconds is not None and time.monotonic() - start > timeout_seconds:
            raise TimeoutError(f"stage {name} did not finish within {timeout_seconds} s: {final}")
        time.sleep(poll_seconds)
    return final


def run_or_wait_for_stage(cache_dir: str | Path, name: str, inputs: dict[str, Any], build: Callable[[Path], None],
                          is_main: bool, log: Callable[[str], None] = print,
                          legacy: Sequence[dict[str, Any]] = ()) -> Path:
    """``run_stage`` on the main process (``is_main``), ``wait_for_stage`` on the others."""
    if is_main:
        return run_stage(cache_dir, name, inputs, build, log=log, legacy=legacy)
    return wait_for_stage(cache_dir, name, inputs)


__all__ = ["DONE", "stage_key", "stage_dir", "is_done", "run_stage", "wait_for_stage", "run_or_wait_for_stage"]
