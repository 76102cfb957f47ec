"""The service's configuration: one pydantic-settings class, read once (in the app factory) and injected.

Every field can be set from the environment as ``ZUTIS_<FIELD>`` (e.g. ``ZUTIS_MAX_BATCH_SIZE=16``). Nothing else
in the service reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.dtypes import DtypeName
from model.runtime import RuntimeName

DEFAULT_CHECKPOINT = Path("weights/zutis-shapes.safetensors")
ZOO_PREFIX = "zoo:"  # ZUTIS_CHECKPOINT=zoo:NAME (model.zoo.ZOO_PREFIX; not imported: settings load before torch)
MiB = 1024 * 1024


class Settings(BaseSettings):
    """Model, batching, limits, security and server settings (environment prefix ``ZUTIS_``)."""

    # Empty variables count as unset: compose files pass ZUTIS_* through from the shell, empty when not set there.
    model_config = SettingsConfigDict(env_prefix="ZUTIS_", env_ignore_empty=True, extra="forbid", frozen=True)

    # -- model ------------------------------------------------------------------------------------------------
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="checkpoint file (our safetensors format; a relative "
                                                             "path is relative to the working directory), or "
                                                             "zoo:NAME, a model of the zoo fetched into "
                                                             "ZUTIS_CACHE_DIR at start-up (python -m model.fetch)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: DtypeName = Field(
        "auto", description="compute precision: auto is bfloat16 on a CPU with native bfloat16 (AMX or AVX-512 "
                            "BF16), float32 on other CPUs, float16 autocast on CUDA; float32 reproduces the "
                            "official code exactly")
    input_size: int | None = Field(None, ge=8, description="letterbox size S, or the longer-side cap in native "
                                                           "geometry; default: the checkpoint's")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (process-wide); default: "
                                                              "torch's own choice (the cores)")
    flush_denormal: bool = Field(True, description="flush denormal floats to zero in the model's threads "
                                                   "(CPU speed; see docs/shapes-notes)")
    runtime: RuntimeName = Field("auto", description="what runs the image network: torch, openvino (CPU only) or "
                                                     "auto (OpenVINO on a CPU when installed, torch on a GPU)")

    # -- model zoo (ZUTIS_CHECKPOINT=zoo:NAME) -----------------------------------------------------------------
    cache_dir: Path = Field(Path("~/.cache/zutis"), description="files made once and reused: zoo models downloaded "
                                                                "and converted (shared with python -m model.fetch), "
                                                                "and the OpenVINO export of a checkpoint")
    zoo_manifest: Path | None = Field(None, description="a zoo manifest (JSON) replacing the built-in one: a private "
                                                        "mirror's URLs and hashes, or private models")

    # -- batching ---------------------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=64, description="most images in one forward pass")
    max_batch_delay_ms: float = Field(5.0, ge=0.0, le=10_000.0,
                                      description="longest wait for more images once the first has arrived")
    queue_size: int = Field(64, ge=1, description="most /segment requests held at once (decoding, waiting for the "
                                                  "model, in a forward pass or post-processing); one more gets 503")
    postprocess_workers: int | None = Field(None, ge=1, le=256, description="threads for decoding, resizing, "
                                            "text encoding, post-processing and JSON; default: the CPU cores this "
                                            "process may use")
    text_cache_size: int = Field(10_000, ge=1, description="text embeddings kept (one per concept)")

    # -- geometry (native batching) ---------------------------------------------------------------------------
    geometry: Literal["letterbox", "native"] | None = Field(
        None, description="letterbox (every image in an S x S square) or native (each image at its own size, "
                          "the official protocol); default: the checkpoint's (letterbox for older checkpoints)")
    max_batch_padding: float = Field(0.25, ge=0.0, le=1.0, description="native geometry: most padding (fraction "
                                     "of token slots) a batch of different-sized images may carry; waiting images "
                                     "are grouped by size to stay under it (1 = no grouping)")

    # -- limits -----------------------------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * MiB, ge=1024, description="largest request body in bytes")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, width x height")
    max_concepts: int = Field(100, ge=1, description="most distinct concepts per request (background excluded)")
    max_concept_length: int = Field(100, ge=1, description="longest concept, in characters")
    max_instances: int = Field(100, ge=0, description="most instances returned; a request may ask for fewer")
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * MiB, description="largest request line plus headers, "
                                                                             "in bytes; more is answered 431")
    request_timeout_s: float = Field(30.0, gt=0.0, description="deadline of a request from its arrival; past it "
                                                               "the answer is 504")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 503 answers, in seconds")
    head_timeout_s: float = Field(10.0, gt=0.0, description="longest wait for a request's line and headers, from "
                                  "the connection's opening or the request's first byte; then 408 and close")
    body_idle_timeout_s: float = Field(10.0, gt=0.0, description="longest pause inside a request body (no byte "
                                       "arriving); then 408 and close")
    body_timeout_s: float = Field(60.0, gt=0.0, description="longest time to receive a whole request body, from "
                                  "the end of its headers; then 408 and close")
    max_connections: int | None = Field(None, ge=1, description="most open client connections; one more is "
                                        "answered 503 and closed; default: sized from the open-file limit "
                                        "(RLIMIT_NOFILE soft limit less a reserve for the process's own files)")

    # -- images -----------------------------------------------------------------------------------------------
    exif_orientation: bool = Field(True, description="turn photos upright by their EXIF orientation before "
                                                     "segmenting (answers in the frame a person sees)")
    image_url_hosts: str = Field("", description="comma-separated host names (or addresses, or CIDR networks) "
                                 "that a request's image_url may name; empty: image_url is off. Loopback, private "
                                 "and link-local addresses are refused unless listed as addresses or networks")
    image_url_timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="longest fetch of an image_url, "
                                       "redirects included, in seconds")

    # -- security ---------------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="when set, /segment and /info need it as "
                                                        "'Authorization: Bearer <key>' or 'X-API-Key: <key>'")

    # -- server -----------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="interface uvicorn binds (0.0.0.0 in the container)")
    port: int = Field(8000, ge=0, le=65535)
    drain_timeout_s: float = Field(30.0, gt=0.0, description="longest time from SIGTERM to exit: the grace "
                                                             "period, then the wait for accepted requests")
    drain_grace_s: float = Field(0.0, ge=0.0, description="after SIGTERM, seconds during which /readyz is 503 but "
                                                          "new requests are still accepted (endpoint removal)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _zoo_name_given(self) -> Settings:
        if str(self.checkpoint) == ZOO_PREFIX:
            raise ValueError(f"ZUTIS_CHECKPOINT={self.checkpoint}: name a zoo model after '{ZOO_PREFIX}', e.g. "
                             f"{ZOO_PREFIX}coco-vit-b16 (python -m model.fetch --list shows them)")
        return self

    def zoo_model(self) -> str | None:
        """The zoo model's name when ``ZUTIS_CHECKPOINT`` is ``zoo:NAME``; None for a checkpoint file."""
        value = str(self.checkpoint)
        return value[len(ZOO_PREFIX):] if value.startswith(ZOO_PREFIX) else None

    @model_validator(mode="after")
    def _grace_within_drain(self) -> Settings:
        if self.drain_grace_s >= self.drain_timeout_s:
            raise ValueError(f"ZUTIS_DRAIN_GRACE_S={self.drain_grace_s:g}: must be less than ZUTIS_DRAIN_TIMEOUT_S "
                             f"({self.drain_timeout_s:g}), which bounds the whole shutdown")
        return self

    def limits(self) -> dict[str, int | float]:
        """Every request limit, as /info reports them."""
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_concepts": self.max_concepts,
            "max_concept_length": self.max_concept_length,
            "max_instances": self.max_instances,
            "max_header_bytes": self.max_header_bytes,
            "request_timeout_s": self.request_timeout_s,
            "queue_size": self.queue_size,
            "head_timeout_s": self.head_timeout_s,
            "body_idle_timeout_s": self.body_idle_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            "max_connections": self.connection_limit(),
        }

    def image_url_host_list(self) -> list[str]:
        """``image_url_hosts`` as a list (blanks dropped)."""
        return [h.strip() for h in self.image_url_hosts.split(",") if h.strip()]

    def batching(self) -> dict[str, int | float]:
        """The batching knobs, as /info reports them."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_batch_delay_ms": self.max_batch_delay_ms,
            "max_batch_padding": self.max_batch_padding,
            "queue_size": self.queue_size,
            "postprocess_workers": self.workers(),
            "text_cache_size": self.text_cache_size,
        }

    def connection_limit(self) -> int:
        """Open client connections allowed: the setting, else the open-file soft limit less a reserve (an eighth,
        at least 64) for what the process itself opens (checkpoint, libraries, pipes, threads' files)."""
        if self.max_connections is not None:
            return self.max_connections
        return default_connection_limit()

    def workers(self) -> int:
        """Post-processing threads: the setting, else the CPU cores this process may run on."""
        if self.postprocess_workers is not None:
            return self.postprocess_workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # no sched_getaffinity (macOS)
            return max(1, os.cpu_count() or 1)


def default_connection_limit() -> int:
    """The open-file soft limit (RLIMIT_NOFILE) less an eighth of it (at least 64) kept for the process's own
    files; 1,000,000 when the limit is infinite or unknown (Windows)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1_000_000
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1_000_000
    return max(1, soft - max(64, soft // 8))


def describe_settings_error(error: ValidationError) -> str:
    """A settings validation error as one line naming each variable, its value and the rule it breaks, e.g.
    ``invalid setting: ZUTIS_MAX_BATCH_SIZE=0: should be greater than or equal to 1``. The API key is never shown."""
    parts = []
    for item in error.errors():
        location = [str(p) for p in item.get("loc", ())]
        message = str(item.get("msg", "invalid value"))
        message = message[:1].lower() + message[1:]
        if not location:  # a rule across fields (model validator)
            parts.append(message.removeprefix("value error, "))
            continue
        name = f"ZUTIS_{location[0].upper()}"
        value = item.get("input")
        if location[0] == "api_key" or isinstance(value, (dict, list)):
            parts.append(f"{name}: {message.replace('input should be', 'should be')}")
        else:
            parts.append(f"{name}={value}: {message.replace('input should be', 'should be')}")
    return "invalid setting: " + "; ".join(parts)
