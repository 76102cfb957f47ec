"""Which runtime executes the image network: names, resolution per device, and the on-disk cache directory.

No torch or OpenVINO at import: the service validates its settings against these names before loading anything.

- ``torch``: the network as a torch module (CPU or CUDA).
- ``openvino``: the image network exported to OpenVINO once per checkpoint and compiled for this CPU
  (``model.openvino_runtime``); CPU only. Text encoding and post-processing stay torch.
- ``auto``: OpenVINO on a CPU when the package is installed (faster than torch in float32 and in bfloat16 on the
  CPUs measured, README "CPU inference"), torch on a GPU or without OpenVINO.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

RuntimeName = Literal["auto", "torch", "openvino"]
RUNTIME_NAMES: tuple[str, ...] = get_args(RuntimeName)


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(name: str, device_type: str) -> tuple[str, str]:
    """``(runtime, reason)`` for a runtime name on a device type (``"cpu"``, ``"cuda"``).

    ``ValueError`` for an unknown name, OpenVINO on a GPU, or OpenVINO asked for but not installed.
    """
    if name not in RUNTIME_NAMES:
        raise ValueError(f"unknown runtime {name!r}; use auto, torch or openvino")
    if name == "torch":
        return "torch", "runtime=torch asked for"
    if device_type != "cpu":
        if name == "openvino":
            raise ValueError(f"the OpenVINO runtime runs on the CPU only; device {device_type} uses torch")
        return "torch", f"auto on {device_type}: torch"
    if openvino_available():
        return "openvino", "openvino asked for" if name == "openvino" else "auto on a CPU: OpenVINO is installed"
    if name == "openvino":
        raise ValueError("runtime openvino asked for but the openvino package is not installed (pip install openvino)")
    return "torch", "auto on a CPU: OpenVINO is not installed, torch"


__all__ = ["RUNTIME_NAMES", "RuntimeName", "openvino_available", "resolve_runtime"]
