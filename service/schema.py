"""The HTTP answer of ``POST /segment``: the answer's models of ``model.answer``, where the one encoder of the
answer lives (the service, ``python -m model.predict`` and the evaluation share it).

Importing this module loads pydantic only (no torch, FastAPI or uvicorn).
"""

from __future__ import annotations

from model.answer import (RLE, SCORE_DECIMALS, AnswerFormat, ImageSize, Instance, MaskFormat, SegmentResponse,
                          SemanticFormat, SemanticMap, SemanticSegment, Timings, build_response, encode_answer)

__all__ = ["RLE", "SCORE_DECIMALS", "AnswerFormat", "ImageSize", "Instance", "MaskFormat", "SegmentResponse",
           "SemanticFormat", "SemanticMap", "SemanticSegment", "Timings", "build_response", "encode_answer"]
