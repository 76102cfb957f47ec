"""The request of ``POST /segment``: one typed object (``SegmentRequest``) built at the edge from either body.

Both bodies carry the same fields, declared once here: a multipart form (``image`` a file, as ``curl -F
image=@photo.jpg`` sends it) or a JSON object (``image`` base64 or a ``data:image/...;base64,`` URI). Either may
name an ``image_url`` instead (fetched only when ``ZUTIS_IMAGE_URL_HOSTS`` allows it: ``service.image_url``).
A new option is one field of ``SegmentRequest`` plus its use.

Strict: an unknown field is a 422 naming it and listing the accepted ones; a single-valued field given twice is a
422; ``concepts`` may be repeated, comma-separated, or a JSON array of strings; ``concepts`` and ``vocabulary`` are
exclusive, and one of them is required.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol, get_args

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from model.answer import DEFAULT_POLYGON_TOLERANCE, AnswerFormat, MaskFormat, SemanticFormat
from service.concepts import parse_concepts
from service.errors import ServiceError

# The official vocabularies (model.vocabularies.VOCABULARIES; a test keeps the two equal) and the checkpoint's own.
VocabularyName = Literal["coco", "coca", "imagenet_s919", "checkpoint"]
VOCABULARY_NAMES: tuple[str, ...] = get_args(VocabularyName)
FILE_HINT = "image: send a file, e.g. curl -F image=@photo.jpg"


class SegmentRequest(BaseModel):
    """What to segment for and how to answer: every field of both bodies except the image itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concepts: list[str] | None = Field(None, description="concept names (JSON: an array of strings, or one "
                                                         "comma-separated string; form: repeat the field and/or "
                                                         "separate with commas, or send a JSON array); "
                                                         "'background' is always added as concept 0. Exclusive "
                                                         "with vocabulary")
    vocabulary: VocabularyName | None = Field(None, description="a named vocabulary instead of concepts: coco, "
                                                                "coca, imagenet_s919, or checkpoint (the one the "
                                                                "checkpoint was trained or converted with)")
    # allow_inf_nan=False: "nan" is answered "should be a finite number", not "should be less than or equal to 1".
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                          description="minimum instance score")
    mask_threshold: float | None = Field(None, ge=0.0, lt=1.0, allow_inf_nan=False,
                                         description="mask probability cut")
    nms_iou: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="class-wise mask NMS IoU")
    max_instances: int | None = Field(None, ge=0, description="most instances returned")
    semantic: SemanticFormat = Field("png", description="semantic map encoding")
    mask_format: MaskFormat = Field("rle", description="instance masks as COCO RLE or COCO polygons (polygons "
                                                       "cannot carry holes)")
    polygon_tolerance: float = Field(DEFAULT_POLYGON_TOLERANCE, ge=0.0, le=1000.0, allow_inf_nan=False,
                                     description="polygon simplification in pixels (mask_format=polygon); 0 keeps "
                                                 "every corner of the pixel outline")

    def overrides(self) -> dict[str, float | int | None]:
        """The ``InferenceParams`` fields this request overrides (None: the checkpoint's default)."""
        return {"score_threshold": self.score_threshold, "mask_threshold": self.mask_threshold,
                "nms_iou": self.nms_iou, "max_instances": self.max_instances}

    def answer_format(self) -> AnswerFormat:
        """How the answer encodes its masks."""
        return AnswerFormat(self.semantic, self.mask_format, self.polygon_tolerance)


class SegmentJSONBody(SegmentRequest):
    """``POST /segment`` with ``Content-Type: application/json``."""

    image: str | None = Field(None, description="the image file, base64 (standard alphabet) or a data URI "
                                                "(data:image/png;base64,...)")
    image_url: str | None = Field(None, description="an http(s) URL to fetch the image from, instead of image "
                                                    "(only hosts listed in ZUTIS_IMAGE_URL_HOSTS)")


class SegmentFormBody(SegmentRequest):
    """``POST /segment`` with ``Content-Type: multipart/form-data`` (the OpenAPI description of the form)."""

    image: bytes | None = Field(None, json_schema_extra={"format": "binary"},
                                description="the image file (PNG, JPEG, WebP, BMP, GIF, TIFF)")
    image_url: str | None = Field(None, description="an http(s) URL to fetch the image from, instead of image "
                                                    "(only hosts listed in ZUTIS_IMAGE_URL_HOSTS)")


ACCEPTED_FIELDS: tuple[str, ...] = ("image", "image_url", *SegmentRequest.model_fields)
REPEATABLE_FIELDS = frozenset({"concepts"})


class ImageSource(Protocol):
    """Where a request's image bytes come from; ``read`` runs in a worker thread."""

    def read(self) -> bytes: ...


@dataclass(frozen=True)
class UploadedImage:
    """A multipart upload (Starlette's spooled file: only the requests being decoded hold the bytes)."""

    file: BinaryIO

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()


@dataclass(frozen=True)
class EncodedImage:
    """The decoded bytes of a JSON body's base64 image."""

    data: bytes

    def read(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Limits:
    """The edge's part of the settings."""

    max_concepts: int
    max_concept_length: int
    max_instances: int


def parse_form(form: FormData, limits: Limits) -> tuple[UploadedImage | str, SegmentRequest]:
    """A multipart (or url-encoded) form -> its image (an upload, or the ``image_url`` string) and request.

    Raises:
        ServiceError / RequestValidationError: 422 unknown or repeated field, text where the file belongs, a
        missing image or concept list, a bad value.
    """
    _check_names([key for key, _ in form.multi_items()], "form")
    for key in set(form.keys()) - REPEATABLE_FIELDS:
        if len(form.getlist(key)) > 1:
            what = "two images" if key == "image" else f"{len(form.getlist(key))} values"
            raise ServiceError("invalid_request", f"{key}: sent {len(form.getlist(key))} times ({what}); send it "
                               "once")
    image = form.get("image")
    if image is not None and not isinstance(image, UploadFile):
        raise ServiceError("invalid_request", FILE_HINT)
    image_url = form.get("image_url")
    if isinstance(image_url, UploadFile):
        raise ServiceError("invalid_request", "image_url: send the URL as text, not as a file")
    values: dict[str, Any] = {}
    for key in set(form.keys()) - {"image", "image_url", "concepts"}:
        value = form[key]
        if isinstance(value, UploadFile):
            raise ServiceError("invalid_request", f"{key}: send a value, not a file")
        if value.strip() != "":  # an empty form field counts as not sent (HTML forms send empty inputs)
            values[key] = value
    if "concepts" in form:
        raw = form.getlist("concepts")
        if any(isinstance(v, UploadFile) for v in raw):
            raise ServiceError("invalid_request", "concepts: send text, not a file")
        values["concepts"] = _split_form_concepts([str(v) for v in raw])
    source = _one_image(UploadedImage(image.file) if image is not None else None, image_url or None)
    return source, _request(values, limits, strict=False)


def parse_json(body: bytes, limits: Limits) -> tuple[EncodedImage | str, SegmentRequest]:
    """A JSON body -> its image (decoded base64, or the ``image_url`` string) and request.

    Raises:
        ServiceError: 400 not JSON or bad base64; 415 a data URI of a non-image type; 422 not an object, unknown
        or repeated field, wrong type or bad value (the field named).
    """
    try:
        data = json.loads(body, object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as exc:
        raise ServiceError("invalid_request", f"{exc.args[0]}: given twice in the JSON object; give it once") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and invalid UTF-8 (UnicodeDecodeError)
        raise ServiceError("malformed_request", f"the JSON body could not be parsed ({exc})") from None
    if not isinstance(data, dict):
        raise ServiceError("invalid_request", f"the JSON body must be an object ({{\"image\": ..., \"concepts\": "
                           f"[...]}}), got {type(data).__name__ if data is not None else 'null'}")
    _check_names(list(data), "JSON")
    image, image_url = data.pop("image", None), data.pop("image_url", None)
    for name, value in (("image", image), ("image_url", image_url)):
        if value is not None and not isinstance(value, str):
            raise ServiceError("invalid_request", f"{name}: must be a string (base64, or a data URI)"
                               if name == "image" else f"{name}: must be a string")
    if isinstance(data.get("concepts"), str):  # one string: comma-separated, as in the form
        data["concepts"] = [data["concepts"]]
    source = _one_image(EncodedImage(decode_base64_image(image)) if image is not None else None, image_url)
    return source, _request(data, limits, strict=True)


def _check_names(names: Sequence[str], body: str) -> None:
    unknown = [name for name in dict.fromkeys(names) if name not in ACCEPTED_FIELDS]
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in unknown[:5])
        raise ServiceError("invalid_request", f"unknown {body} field{'s' if len(unknown) > 1 else ''} {shown}; "
                           f"accepted: {', '.join(ACCEPTED_FIELDS)}")


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _split_form_concepts(values: list[str]) -> list[str]:
    """Form values of ``concepts``: a value that is a JSON array (``["red circle", "blue star"]``) is that list;
    values are split at commas later (``parse_concepts``), array items too."""
    concepts: list[str] = []
    for value in values:
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                items = None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ServiceError("invalid_request", "concepts: a value starting with '[' must be a JSON array of "
                                   "strings, e.g. [\"red circle\", \"blue star\"]")
            concepts.extend(items)
        else:
            concepts.append(value)
    return concepts


def _one_image(image: ImageSource | None, image_url: str | None) -> ImageSource | str:
    if image is not None and image_url is not None:
        raise ServiceError("invalid_request", "image and image_url: send one of them, not both")
    if image is None and image_url is None:
        raise ServiceError("invalid_request", "image: field required (a file, or base64 in a JSON body; or "
                           "image_url)")
    return image if image is not None else image_url  # type: ignore[return-value]


def _request(values: Mapping[str, Any], limits: Limits, strict: bool) -> SegmentRequest:
    try:
        request = SegmentRequest.model_validate(values, strict=strict)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if request.concepts is not None and request.vocabulary is not None:
        raise ServiceError("invalid_request", "concepts and vocabulary: send one of them, not both")
    if request.concepts is None and request.vocabulary is None:
        raise ServiceError("invalid_request", "concepts: field required (or name a vocabulary: vocabulary="
                           f"{'|'.join(VOCABULARY_NAMES)})")
    if request.max_instances is not None and request.max_instances > limits.max_instances:
        raise ServiceError("invalid_request", f"max_instances={request.max_instances} is above this service's "
                           f"limit of {limits.max_instances}")
    if request.concepts is not None:
        concepts = parse_concepts(request.concepts, limits.max_concepts, limits.max_concept_length)
        request = request.model_copy(update={"concepts": concepts})
    return request


_DATA_URI = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)


def decode_base64_image(value: str) -> bytes:
    """A JSON body's ``image``: plain base64 (whitespace allowed) or ``data:image/<type>;base64,<data>``.

    Raises:
        ServiceError: 415 a data URI of a non-image type; 400 (``invalid_image``) bad base64 or a data URI that is
        not base64.
    """
    text = value
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if match is None:
            raise ServiceError("invalid_image", "image: a data URI needs a comma before its data "
                               "(data:image/png;base64,...)")
        media_type = match["type"].strip().lower()
        if not media_type.startswith("image/"):
            raise ServiceError("unsupported_media_type", f"image: the data URI is of type {media_type or 'text/plain'}"
                               "; send an image (data:image/png;base64,...)")
        if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
            raise ServiceError("invalid_image", "image: the data URI must be base64 (data:image/png;base64,...)")
        text = text[match.end():]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError("invalid_image", f"image: not valid base64 ({exc})") from None


__all__ = ["SegmentRequest", "SegmentJSONBody", "SegmentFormBody", "ACCEPTED_FIELDS", "VOCABULARY_NAMES",
           "ImageSource", "UploadedImage", "EncodedImage", "Limits", "parse_form", "parse_json",
           "decode_base64_image", "FILE_HINT"]
