"""Every failure of the client library is a ZutisError: malformed answers and wrong arguments included."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from zutis_client import ZutisError
from zutis_client.client import segment_fields, segment_request
from zutis_client.result import SegmentResult


def _answer() -> dict:
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"model": "m", "image": {"width": 6, "height": 4}, "concepts": ["background", "cat"],
            "instances": [{"concept": "cat", "concept_index": 1, "score": 0.9, "bbox": [2, 1, 3, 2], "area": 6,
                           "segmentation": {"size": [4, 6], "counts": rle["counts"].decode()}}],
            "semantic": None, "timings": {}}


def test_from_json_reads_a_well_formed_answer() -> None:
    result = SegmentResult.from_json(_answer())
    assert result.instances[0].mask.sum() == 6


@pytest.mark.parametrize("damage", [
    lambda a: a.pop("image"),
    lambda a: a["image"].update(height="tall"),
    lambda a: a["instances"][0].pop("score"),
    lambda a: a.update(instances=[None]),
    lambda a: a.update(concepts=7),
])
def test_from_json_of_a_malformed_answer_is_a_zutis_error(damage) -> None:
    answer = copy.deepcopy(_answer())
    damage(answer)
    with pytest.raises(ZutisError) as info:
        SegmentResult.from_json(answer)
    assert info.value.type == "invalid_answer"


def test_a_broken_polygon_in_an_answer_is_a_zutis_error() -> None:
    answer = _answer()
    answer["instances"][0]["segmentation"] = [[1.0, 2.0, 3.0]]
    result = SegmentResult.from_json(answer)
    with pytest.raises(ZutisError) as info:
        result.instances[0].mask
    assert info.value.type == "invalid_answer"


def test_wrong_arguments_are_zutis_errors() -> None:
    with pytest.raises(ZutisError):
        segment_fields(None, None)
    with pytest.raises(ZutisError):
        segment_fields([" , "])
    with pytest.raises(ZutisError):
        segment_request(b"x", {"concepts": ["a"]}, "xml")  # type: ignore[arg-type]
