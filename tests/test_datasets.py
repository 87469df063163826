import numpy as np
import pytest
import torch

from koopnet.io.datasets import make_yinyang, normalize_images, yinyang_class, yinyang_splits


@pytest.mark.parametrize(("x", "y", "expected"), [
    (0.75, 0.5, 2),    # centre of the right dot
    (0.25, 0.5, 2),    # centre of the left dot
    (0.25, 0.62, 1),   # d_left = 0.12 in (0.1, 0.25]: the yin ring around the left dot
    (0.75, 0.62, 0),   # d_right = 0.12 <= 0.25: the yang ring around the right dot
    (0.5, 0.9, 1),     # upper half, far from the right dot: yin
    (0.5, 0.1, 0),     # lower half, far from the left dot: yang
])
def test_class_rule_at_hand_computed_points(x, y, expected):
    assert yinyang_class(x, y) == expected


def test_paper_variant_is_balanced_deterministic_and_dot_free():
    X, y = make_yinyang(2000, seed=5)
    assert X.shape == (2000, 2) and set(y.tolist()) == {0, 1}
    assert abs(float(y.float().mean()) - 0.5) < 0.04  # goals drawn 50/50: 4 sd margin
    X2, y2 = make_yinyang(2000, seed=5)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    for point in X.double().numpy():
        d_right = np.hypot(point[0] - 0.75, point[1] - 0.5)
        d_left = np.hypot(point[0] - 0.25, point[1] - 0.5)
        assert min(d_right, d_left) >= 0.1
        assert np.hypot(point[0] - 0.5, point[1] - 0.5) <= 0.5
    assert not torch.equal(make_yinyang(50, seed=6)[0], X[:50])


def test_original_three_class_variant():
    X, y = make_yinyang(1500, seed=42, n_classes=3)
    assert X.shape == (1500, 4) and set(y.tolist()) == {0, 1, 2}
    assert torch.allclose(X[:, 2:], 1 - X[:, :2])
    counts = torch.bincount(y)
    assert counts.min() > 430  # each class ~500 (binomial sd ~18)


def test_splits_use_independent_seeds():
    splits = yinyang_splits(n_train=100, n_val=50, n_test=50)
    assert splits.n_features == 2 and splits.n_classes == 2
    rows = [{tuple(x) for x in split.X.tolist()} for split in (splits.train, splits.val,
                                                              splits.test)]
    assert [len(r) for r in rows] == [100, 50, 50]  # no duplicates inside a split
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])  # none shared
    with pytest.raises(ValueError, match="unknown Yin-Yang variant 'yy'"):
        yinyang_splits("yy")


def test_normalize_images_matches_to_tensor_and_normalize():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = normalize_images(images, 0.1307, 0.3081)
    assert out.shape == (1, 4)
    assert torch.allclose(out[0, 1], torch.tensor((1.0 - 0.1307) / 0.3081))
