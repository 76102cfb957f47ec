"""The unit every evaluation report uses: a fraction in [0, 1] as a percentage, an undefined value as ``None``."""

from __future__ import annotations

import math


def percent(value: float) -> float | None:
    """A fraction in [0, 1] as a percentage; pycocotools' -1 and NaN (undefined) become None."""
    value = float(value)
    return None if math.isnan(value) or value < 0 else 100.0 * value


__all__ = ["percent"]
