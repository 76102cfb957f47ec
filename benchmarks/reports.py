"""What the benchmark scripts do with their figures: latency summaries, and an optional JSON file beside the printed
lines at the end."""

from __future__ import annotations

import json
import statistics
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


def latency_summary(values: list[float], scale: float = 1.0, digits: int = 2) -> dict[str, float]:
    """``{"p50": median, "p99": the value at rank int(0.99 n), "max"}`` of ``values``, each multiplied by ``scale``
    (1000: seconds to ms) and rounded to ``digits``; ``{}`` when there are none."""
    if not values:
        return {}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50": round(statistics.median(ordered) * scale, digits), "p99": round(p99 * scale, digits),
            "max": round(ordered[-1] * scale, digits)}
