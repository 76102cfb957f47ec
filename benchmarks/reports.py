"""What every benchmark script does with its figures at the end: an optional JSON file beside the printed lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json_report(path: Path | None, report: Any, announce: bool = True) -> None:
    """Write ``report`` as indented JSON (and a final newline) to ``path``, its folder created, saying so when
    ``announce``; nothing when ``path`` is None (no ``--out`` given)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if announce:
        print(f"wrote {path}")
