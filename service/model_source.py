"""Where the service's model comes from: a checkpoint file (``checkpoint_loader``), or with
``ZUTIS_CHECKPOINT=zoo:NAME`` the zoo entry (checked at start-up,
before anything else starts) and the loader that fetches it (``model.fetch``: found in ``ZUTIS_CACHE_DIR``, or
downloaded, verified and converted there) and then loads it.

The loader runs in the engine's model thread while the engine is ``loading``: ``/healthz`` answers 200 and
``/readyz`` 503 during the download, whose progress goes to the log (one line every 10 s). A failed fetch is one
``FetchError`` line in the log, and the process exits non-zero (``service.__main__``).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Callable

from model.download import DownloadPolicy
from model.fetch import fetch_model
from model.predictor import Predictor
from model.zoo import ZooModel, find_model
from service.settings import Settings

log = logging.getLogger("service")


def resolve_zoo_model(settings: Settings) -> ZooModel | None:
    """The zoo entry ``ZUTIS_CHECKPOINT=zoo:NAME`` names (from ``ZUTIS_ZOO_MANIFEST`` or the built-in manifest),
    or None for a checkpoint file. ``ValueError`` (``model.zoo.ManifestError``) for an unknown name or a bad
    manifest."""
    name = settings.zoo_model()
    return None if name is None else find_model(name, settings.zoo_manifest)


def zoo_loader(settings: Settings, model: ZooModel) -> Callable[[], Predictor]:
    """A loader that fetches ``model`` into ``settings.cache_dir`` (or finds it there), then loads it with the
    settings' device, dtype, input size and geometry."""

    def load() -> Predictor:
        log.info("fetching zoo model %s into %s", model.name, settings.cache_dir)
        result = fetch_model(model, settings.cache_dir, policy=DownloadPolicy(progress="log"),
                             command=f"python -m service (ZUTIS_CHECKPOINT=zoo:{model.name})")
        log.info("zoo model %s: %s (%s)", model.name, result.checkpoint,
                 "from the cache" if result.cached else "downloaded and converted")
        return checkpoint_loader(settings, result.checkpoint)()

    return load


def checkpoint_loader(settings: Settings, path: Path) -> Callable[[], Predictor]:
    """A loader of the checkpoint file ``path`` with every setting that shapes the predictor: device, dtype,
    input size, geometry, runtime and the cache of its exports."""
    return partial(Predictor.from_checkpoint, path, settings.device, settings.dtype, settings.input_size,
                   settings.geometry, settings.runtime, settings.cache_dir)
