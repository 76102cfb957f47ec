"""The pure parts of experiments/shapes/clip_probe.py: which object owns each token, per-object features, the probe."""

import numpy as np

from experiments.shapes.clip_probe import fit_linear_probe, object_features, token_centre_owner


def test_token_centre_owner_reads_the_object_under_each_token_centre():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4, :4] = True  # top-left quarter
    masks[1, 4:, 2:] = True  # bottom rows, right of column 2
    owner = token_centre_owner(masks, 2, 4)  # token centres at rows 2, 6 and columns 1, 3, 5, 7
    assert owner.tolist() == [0, 0, -1, -1,
                              -1, 1, 1, 1]
    assert token_centre_owner(np.zeros((0, 8, 8), bool), 2, 2).tolist() == [-1] * 4


def test_object_features_average_each_objects_tokens_and_skip_tokenless_objects():
    tokens = np.arange(12, dtype=np.float32).reshape(4, 3)
    feats, kept = object_features(tokens, np.array([1, -1, 1, 2]), 3)
    assert kept.tolist() == [1, 2]
    np.testing.assert_allclose(feats, [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]])


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 16))
    assert fit_linear_probe(x[:200], y[:200], x[200:], y[200:], 4) > 0.95
    noise = rng.normal(size=(400, 16))
    assert fit_linear_probe(noise[:200], y[:200], noise[200:], y[200:], 4) < 0.45
