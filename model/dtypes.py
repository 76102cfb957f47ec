"""Compute-precision names, in one place: what ``Predictor.from_checkpoint(dtype=...)``, ``--dtype`` and
``ZUTIS_DTYPE`` accept.

No torch at import: the service validates its settings against these names before torch is imported.
``model.predictor.resolve_precision`` turns a name into a ``torch.dtype`` for a device, with the reason;
``native_bf16_feature`` says whether this CPU computes bfloat16 natively (what ``auto`` picks on a CPU).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

# "auto" is resolved per device (on a CPU: bfloat16 where it is native, else float32; float16 on CUDA); the short
# names are aliases.
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


# CPU features with native bfloat16 arithmetic, best first: AMX tiles (Sapphire Rapids and later), AVX-512 BF16
# dot products (Cooper Lake, Zen 4 and later). Without them bfloat16 is emulated and gives no speed-up.
BF16_FEATURES = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def native_bf16_feature() -> str | None:
    """The first of ``BF16_FEATURES`` this CPU has (``"amx_bf16"``, ``"avx512_bf16"``), or None.

    Asks torch's own CPU probe (``torch.cpu.get_capabilities``, what its kernels dispatch on) and falls back to
    the Linux ``/proc/cpuinfo`` flags when that probe is missing (older torch).
    """
    try:
        import torch

        capabilities = torch.cpu.get_capabilities()
        return next((f for f in BF16_FEATURES if capabilities.get(f)), None)
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    return next((f for f in BF16_FEATURES if f in flags), None)


__all__ = ["BF16_FEATURES", "DTYPE_NAMES", "DtypeName", "canonical_dtype", "native_bf16_feature"]
