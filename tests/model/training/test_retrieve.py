"""model.retrieve and model.prompts: prompt ensembling, streamed top-n against a full sort, outputs and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.backbone import build_tokenizer
from model.clip_weights import save_clip
from model.training.index import build_index, load_index
from model.training.prompts import PROMPT_TEMPLATES, fill_templates
from model.training.retrieve import encode_concepts, load_retrieval, main, retrieve, select_concepts, top_n
from tests.model.training.test_index import tiny_clip, write_images


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, clip):
    root = tmp_path_factory.mktemp("retrieve")
    write_images(root / "images", 23)
    return build_index([root / "images"], clip, root / "index", batch_size=8, shard_size=7, progress=False)


def test_prompt_templates_are_clips_80_plus_denseclips_5():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(PROMPT_TEMPLATES) == 85 and len(set(PROMPT_TEMPLATES)) == 85
    assert list(PROMPT_TEMPLATES[:80]) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert PROMPT_TEMPLATES[0] == "a bad photo of a {}." and PROMPT_TEMPLATES[-1] == "this is one {} in the scene."
    assert fill_templates("cat {x}", ["a {}."]) == ["a cat {x}."]
    with pytest.raises(ValueError):
        fill_templates("cat", ["no slot"])


def test_select_concepts_drops_background_and_duplicates():
    assert select_concepts([" cat", "Background", "dog", "cat", "background"]) == ["cat", "dog"]
    with pytest.raises(ValueError):
        select_concepts(["background"])
    with pytest.raises(ValueError):
        select_concepts(["cat", "  "])


def test_encode_concepts_is_the_renormalised_mean_of_normalised_prompts(clip):
    templates = ["a photo of a {}.", "a {} in the scene.", "art of the {}."]
    got = encode_concepts(["red circle", "dog"], clip, templates, batch_size=2)
    tokenizer = build_tokenizer(clip.config)
    with torch.no_grad():
        for row, concept in zip(got, ["red circle", "dog"]):
            per_prompt = F.normalize(clip.text(tokenizer([t.format(concept) for t in templates])), dim=-1)
            expected = F.normalize(per_prompt.mean(0), dim=0)
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("n", [1, 5, 23, 40])
def test_top_n_streams_to_the_same_answer_as_a_full_sort(index_dir, n):
    embeddings, _ = load_index(index_dir)
    text = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(n)), dim=1)
    scores, rows = top_n(index_dir, text, n, chunk_rows=3)  # chunks never align with the 7-row shards

    full = text @ torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).T
    order = torch.argsort(full, dim=1, descending=True, stable=True)[:, :min(n, 23)]
    assert rows.shape == (4, min(n, 23)) and torch.equal(rows, order)
    torch.testing.assert_close(scores, torch.gather(full, 1, order), atol=1e-6, rtol=0)


def test_retrieve_writes_paths_and_scores(index_dir, clip, tmp_path):
    out = tmp_path / "retrieval"
    result = retrieve(index_dir, ["background", "cat", "dog", "cat"], clip, n=6, templates=PROMPT_TEMPLATES[:4],
                      out_dir=out)
    assert list(result) == ["cat", "dog"] and all(len(v) == 6 for v in result.values())
    assert load_retrieval(out) == result == json.loads((out / "retrieval.json").read_text())

    scores = json.loads((out / "retrieval_scores.json").read_text())
    assert scores["num_templates"] == 4 and scores["n"] == 6
    embeddings, paths = load_index(index_dir)
    text = encode_concepts(["cat", "dog"], clip, PROMPT_TEMPLATES[:4])
    for concept, t in zip(["cat", "dog"], text):
        s = np.asarray(scores["scores"][concept])
        assert np.all(np.diff(s) <= 0)
        rows = [paths.index(p) for p in result[concept]]
        np.testing.assert_allclose(s, (np.asarray(embeddings, np.float32)[rows] @ t.numpy()), atol=1e-5)


def test_retrieve_refuses_another_clip(index_dir):
    with pytest.raises(ValueError, match="another CLIP"):
        retrieve(index_dir, ["cat"], tiny_clip(seed=3), n=2)


def test_top_n_rejects_bad_arguments(index_dir):
    with pytest.raises(ValueError):
        top_n(index_dir, torch.zeros(1, 32), 0)
    with pytest.raises(ValueError, match="dim"):
        top_n(index_dir, torch.zeros(1, 16), 3)


def test_cli_retrieves_from_a_concepts_file(index_dir, clip, tmp_path, capsys):
    weights = tmp_path / "clip.safetensors"
    save_clip(weights, clip)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("background\nred circle\n\nblue star\n")
    out = tmp_path / "out"
    assert main(["--index", str(index_dir), "--concepts-file", str(concepts), "--concepts", "dog", "--out", str(out),
                 "-n", "3", "--clip", str(weights), "--device", "cpu"]) == 0
    result = load_retrieval(out / "retrieval.json")
    assert list(result) == ["dog", "red circle", "blue star"] and all(len(v) == 3 for v in result.values())
    assert "3 concepts" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        main(["--index", str(index_dir), "--concepts", "dog", "--out", str(out),
              "--clip", str(tmp_path / "nope.safetensors")])
