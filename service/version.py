"""The installed package version (``zutis-service``), for /info and ``zutis_build_info``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("zutis-service")
except PackageNotFoundError:  # running from a checkout that was never pip-installed
    VERSION = "0+unknown"
