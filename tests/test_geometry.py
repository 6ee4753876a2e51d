"""Affine fitting, frame conversions, the FIRE reader and the FIRE metrics."""

import numpy as np
import pytest

from common import (
    InputError,
    apply_affine,
    fire_error,
    fit_affine,
    global_from_local,
    local_from_global,
    norm_from_pixels,
    read_fire,
    scale_matrix,
    success_auc,
    to3x3,
)

A = np.array([[0.98, -0.12, 31.5], [0.11, 1.03, -12.25]])


def test_fit_affine_recovers_known_matrix_from_points():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 700, (10, 2))
    fitted, residual = fit_affine(src, apply_affine(A, src))
    assert np.allclose(fitted, A, atol=1e-9)
    assert residual.max() < 1e-9


def test_fit_affine_with_noise_reports_residuals():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 700, (10, 2))
    dst = apply_affine(A, src) + rng.normal(0, 1.0, (10, 2))
    fitted, residual = fit_affine(src, dst)
    assert 0.2 < residual.mean() < 2.0
    assert np.abs(fitted[:, :2] - A[:, :2]).max() < 0.01


def test_fit_affine_rejects_too_few_or_collinear_points():
    with pytest.raises(ValueError):
        fit_affine([[0, 0], [1, 1]], [[0, 0], [1, 1]])
    line = np.array([[0, 0], [1, 1], [2, 2], [3, 3]], float)
    with pytest.raises(ValueError):
        fit_affine(line, line)


def test_local_global_round_trip_and_prototype_formula():
    left, top = 200, 150
    local = local_from_global(A, left, top)
    # the prototype's formula: t_local = A (left, top, 1) - (left, top)
    assert np.allclose(local[:, 2], A @ [left, top, 1] - [left, top])
    assert np.allclose(local[:, :2], A[:, :2])
    assert np.allclose(global_from_local(local, left, top), A)
    # a point mapped in patch coordinates lands where the full-image matrix sends it
    p = np.array([[37.0, 81.0]])
    assert np.allclose(apply_affine(local, p) + (left, top), apply_affine(A, p + (left, top)))


def test_normalised_and_resize_frames():
    n = norm_from_pixels(128)
    assert np.allclose(apply_affine(n, [[-0.5, -0.5], [127.5, 127.5]]), [[-1, -1], [1, 1]])
    s = scale_matrix(0.5)  # OpenCV resize by 1/2: pixel centres 0,1 -> -0.25, 0.25
    assert np.allclose(apply_affine(s, [[0, 0], [1, 1]]), [[-0.25, -0.25], [0.25, 0.25]])
    assert np.allclose(to3x3(A)[2], [0, 0, 1])


def write_fire(root, pairs):
    (root / "Images").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    for pair, text in pairs.items():
        for i in (1, 2):
            (root / "Images" / f"{pair}_{i}.jpg").write_bytes(b"\xff\xd8 not decoded here \xff\xd9")
        if text is not None:
            (root / "Ground Truth" / f"control_points_{pair}_1_2.txt").write_text(text)


def test_read_fire_layout_categories_and_bad_files(tmp_path):
    good = "".join(f"{i} {i * 2} {i + 1} {i * 2 + 1}\n" for i in range(10))
    write_fire(tmp_path, {"S01": good, "P02": good, "A03": "1 2 3\n4 5 6\n7 8 9\n", "S04": None})
    pairs = {p.pair: p for p in read_fire(tmp_path)}
    assert sorted(pairs) == ["A03", "P02", "S01", "S04"]
    assert pairs["S01"].category == "S" and pairs["P02"].category == "P"
    assert pairs["S01"].points.shape == (10, 4) and pairs["S01"].problem is None
    assert pairs["S01"].fixed.name == "S01_1.jpg" and pairs["S01"].moving.name == "S01_2.jpg"
    assert "3 columns, expected 4" in pairs["A03"].problem
    assert "not found" in pairs["S04"].problem
    with pytest.raises(InputError):
        read_fire(tmp_path / "nowhere")


def test_fire_error_and_auc():
    src = np.array([[0, 0], [100, 0], [0, 100]], float)
    points = np.hstack([apply_affine(A, src), src])
    assert fire_error(A, points) < 1e-9
    shifted = A + [[0, 0, 3], [0, 0, 4]]
    assert fire_error(shifted, points) == pytest.approx(5.0)
    assert fire_error(None, points) == np.inf
    # AUC over 0..25 px: an error of 5 px succeeds for 80% of the thresholds
    assert success_auc([0.0, 5.0, np.inf, 30.0]) == pytest.approx((1 + 0.8 + 0 + 0) / 4)
