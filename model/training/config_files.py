"""Config files that extend another one: an experiment states only what it changes.

A training config or CLIP recipe JSON may hold ``"extends": BASE`` (and optionally ``"remove": [dotted paths]``)
beside the fields it changes. ``read_config`` resolves it: BASE is read (recursively: it may extend another), the
``remove`` paths are deleted from it (each must exist: ``"synthesis.jitter"``, ``"data"``), and the file's own
fields are deep-merged on top (objects merge key by key; a list, a number, a string or ``null`` replaces the base
value). BASE is either a shipped recipe's name (``"shapes"`` is ``model/configs/shapes.json``) or a path relative
to the extending file's folder (``"r0_base.json"``). The result is a plain dict that the usual loaders check
(``TrainConfig.from_dict``, ``ClipRecipe.from_dict``), so an unknown key is still an error however it got there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def read_config(path: str | Path) -> dict[str, Any]:
    """The config at ``path`` with every ``extends`` resolved (see the module docstring). Raises
    ``FileNotFoundError`` for a missing file or base, ``ValueError`` for a cycle, a bad ``remove`` path, or JSON
    that is not an object."""
    return _resolve(Path(path), ())


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` on top: nested objects merged key by key, anything else replaced (new dict; the
    arguments are left as they are)."""
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = json.loads(json.dumps(value))
    return out


def base_path(extends: str, extending_file: Path) -> Path:
    """Where ``"extends": extends`` in ``extending_file`` points: a shipped recipe for a bare name, else a path
    relative to the extending file's folder."""
    if "/" not in extends and not extends.endswith(".json"):
        return SHIPPED_CONFIGS / f"{extends}.json"
    return extending_file.parent / extends


def _resolve(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}" +
                                (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"config files extend each other in a cycle: {chain}")
    d = json.loads(path.read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config file must hold a JSON object")
    if "extends" not in d:
        if "remove" in d:
            raise ValueError(f"{path}: 'remove' needs 'extends' (it deletes fields of the base config)")
        return d
    d = dict(d)
    extends, remove = d.pop("extends"), d.pop("remove", [])
    if not isinstance(extends, str) or not extends:
        raise ValueError(f"{path}: 'extends' must name a shipped recipe or a config file, got {extends!r}")
    if not (isinstance(remove, list) and all(isinstance(r, str) and r for r in remove)):
        raise ValueError(f"{path}: 'remove' must be a list of dotted field paths, got {remove!r}")
    base = _resolve(base_path(extends, path), (*seen, path.resolve()))
    for dotted in remove:
        _remove(base, dotted, path)
    return deep_merge(base, d)


def _remove(d: dict[str, Any], dotted: str, path: Path) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = d
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        raise ValueError(f"{path}: 'remove' names {dotted!r}, which the base config does not have")
    del node[leaf]


__all__ = ["SHIPPED_CONFIGS", "read_config", "deep_merge", "base_path"]
