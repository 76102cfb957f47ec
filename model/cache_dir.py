"""The folder of files made once and reused: zoo downloads and converted checkpoints (``model.fetch``) and the
OpenVINO exports of checkpoints (``model.openvino_runtime``)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$ZUTIS_CACHE_DIR``, else ``~/.cache/zutis``: the command-line tools' default. The service passes its own
    ``ZUTIS_CACHE_DIR`` setting (``service.settings``, the same default) explicitly."""
    return Path(os.environ.get("ZUTIS_CACHE_DIR") or Path.home() / ".cache" / "zutis").expanduser()


__all__ = ["default_cache_dir"]
