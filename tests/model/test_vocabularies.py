"""The shipped official category lists and the COCO label-id map."""

import pytest

from model.vocabularies import COCO_CONTIGUOUS_TO_OFFICIAL_ID, VOCABULARIES, load_vocabulary


@pytest.mark.parametrize("name,count", [("coco", 81), ("coca", 81), ("imagenet_s919", 920)])
def test_load_vocabulary_counts_order_and_uniqueness(name: str, count: int) -> None:
    names = load_vocabulary(name)
    assert len(names) == count
    assert names[0] == "background"
    assert "background" not in names[1:]
    assert len(set(names)) == len(names)
    assert all(n == n.strip() and n for n in names)


def test_load_vocabulary_known_entries() -> None:
    coco = load_vocabulary("coco")
    assert coco[1] == "person" and coco[12] == "stop sign" and coco[80] == "toothbrush"
    coca = load_vocabulary("coca")
    assert coca[1:4] == ["Accordion", "UAV", "Yellow duck"] and coca[80] == "whisk"
    ins = load_vocabulary("imagenet_s919")
    assert ins[1] == "tench" and ins[919] == "toilet tissue"
    # ImageNet's two "crane" synsets are disambiguated in the official list
    assert "crane bird" in ins and "tower crane" in ins and "crane" not in ins


def test_load_vocabulary_returns_a_copy() -> None:
    load_vocabulary("coco").append("x")
    assert len(load_vocabulary("coco")) == 81


def test_load_vocabulary_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown vocabulary"):
        load_vocabulary("voc")
    assert set(VOCABULARIES) == {"coco", "coca", "imagenet_s919"}


def test_coco_id_map() -> None:
    m = COCO_CONTIGUOUS_TO_OFFICIAL_ID
    assert sorted(m) == list(range(81))
    assert m[0] == 0 and m[11] == 11 and m[12] == 13 and m[80] == 90
    assert len(set(m.values())) == 81
    assert set(range(1, 92)) - set(m.values()) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
    assert [m[k] for k in range(81)] == sorted(m.values())
    # spot checks against the COCO annotation file's names
    coco = load_vocabulary("coco")
    official = {13: "stop sign", 27: "backpack", 46: "wine glass", 67: "dining table", 72: "tv", 84: "book"}
    for k, name in enumerate(coco):
        if m[k] in official:
            assert official[m[k]] == name
