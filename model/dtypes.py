"""Compute-precision names, in one place: what ``Predictor.from_checkpoint(dtype=...)``, ``--dtype`` and
``ZUTIS_DTYPE`` accept.

No torch here: the service validates its settings against these names before torch is imported.
``model.predictor.resolve_dtype`` turns a name into a ``torch.dtype`` for a device.
"""

from __future__ import annotations

from typing import Literal, get_args

# "auto" is resolved per device (float32 on CPU, float16 on CUDA); the short names are aliases.
DtypeName = Literal["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def canonical_dtype(name: str) -> str:
    """The torch name of a precision name (``"fp16"`` -> ``"float16"``; ``"auto"`` stays ``"auto"``).

    Raises ``ValueError`` for a name not in ``DTYPE_NAMES``.
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16")
    return _ALIASES.get(name, name)


__all__ = ["DTYPE_NAMES", "DtypeName", "canonical_dtype"]
