"""Affine fitting, frame conversions, the FIRE reader and the FIRE metrics."""

import cv2
import numpy as np
import pytest

from common import (
    InputError,
    Registration,
    Transform,
    apply_affine,
    as_transform,
    fire_error,
    fit_affine,
    fit_transform,
    global_from_local,
    is_inaccurate,
    local_from_global,
    norm_from_pixels,
    read_fire,
    scale_matrix,
    success_auc,
    to3x3,
)

A = np.array([[0.98, -0.12, 31.5], [0.11, 1.03, -12.25]])
# A quadratic that bends by tens of pixels over a 1500 px image (33 px from its own affine part
# at the far corner): the size of a retina's curvature between two views of a wide field.
Q = np.array([[1.02, -0.05, 31.5, 8e-6, -5e-6, 4e-6], [0.04, 0.97, -12.25, -3e-6, 7e-6, 9e-6]])
LEFT = np.array([[0.5, 0.1, 3.0], [-0.2, 0.7, -4.0], [0, 0, 1]])  # two unrelated affine frames
RIGHT = np.array([[1.1, 0.2, -30.0], [0.1, 0.9, 12.0], [0, 0, 1]])


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


# ----------------------------------------------------------------------------------------------
# Transform: the affine and the quadratic model


def image_points(count=40, seed=0, side=1500):
    return np.random.default_rng(seed).uniform(0, side, (count, 2))


def test_transform_holds_an_affine_or_a_quadratic_and_rejects_other_shapes():
    """A 2x3 or 3x3 matrix is an affine, a 2x6 one a quadratic; a 2x4 is neither. A quadratic maps
    [x, y] to M @ [x, y, 1, x*x, x*y, y*y]; an affine as apply_affine does."""
    assert Transform(A).model == "affine" and Transform(to3x3(A)).matrix.shape == (2, 3)
    np.testing.assert_array_equal(Transform(to3x3(A)).matrix, A)
    t = Transform(Q)
    assert t.model == "quadratic" and t.matrix.shape == (2, 6)
    p = image_points(5)
    x, y = p[:, 0], p[:, 1]
    expected = np.stack([x, y, np.ones_like(x), x * x, x * y, y * y], 1) @ Q.T
    np.testing.assert_allclose(t(p), expected, rtol=1e-12)
    np.testing.assert_allclose(Transform(A)(p), apply_affine(A, p), rtol=1e-12)
    assert as_transform(t) is t and as_transform(A).model == "affine"
    for shape in ((2, 4), (3, 6), (2, 2)):
        with pytest.raises(ValueError, match="2x3"):
            Transform(np.zeros(shape))


def test_registration_takes_a_matrix_as_a_transform():
    """Registration.fixed_from_moving is a Transform whether a method gives one or a matrix."""
    assert Registration(A, 1.0).fixed_from_moving.model == "affine"
    np.testing.assert_array_equal(Registration(A, 1.0).fixed_from_moving.matrix, A)
    assert Registration(Transform(Q), 1.0).fixed_from_moving.model == "quadratic"
    assert Registration(None, 0.0, "failed").fixed_from_moving is None


def test_fit_transform_recovers_a_known_quadratic_from_points():
    """Noise-free points of a quadratic: the fitted 2x6 is that matrix (each coefficient to 1e-9
    of itself, the bending ones of 1e-6 included) and every residual is ~0; the affine fitted
    to the same points misses them by pixels."""
    src = image_points()
    fitted, residual = fit_transform(src, Transform(Q)(src), "quadratic")
    assert fitted.model == "quadratic"
    np.testing.assert_allclose(fitted.matrix, Q, rtol=1e-9, atol=0)
    assert residual.shape == (len(src),) and residual.max() < 1e-8
    affine, miss = fit_transform(src, Transform(Q)(src), "affine")
    assert affine.model == "affine" and miss.mean() > 1.0


def test_fit_transform_weights_pull_the_quadratic_towards_the_trusted_points():
    """Weighted least squares: points given a tiny weight (here, moved by 20 px) hardly move the
    fitted quadratic; with equal weights they pull it pixels away."""
    src = image_points(60, seed=1)
    dst = Transform(Q)(src)
    dst[:10] += 20.0
    weights = np.r_[np.full(10, 1e-8), np.ones(50)]
    plain, _ = fit_transform(src, dst, "quadratic")
    weighted, _ = fit_transform(src, dst, "quadratic", weights)
    truth = Transform(Q)(src)
    assert np.abs(weighted(src) - truth).max() < 1e-3
    assert np.abs(plain(src) - truth).max() > 1.0


def test_fit_transform_rejects_what_does_not_define_a_quadratic():
    """Fewer than 6 point pairs, or points all on one conic (a circle: x*x + y*y is a constant,
    so the design's columns are dependent), or an unknown model: ValueError."""
    src = image_points(5)
    with pytest.raises(ValueError, match="6 point pairs"):
        fit_transform(src, Transform(Q)(src), "quadratic")
    angles = np.arange(12.0)
    circle = 700 + 300 * np.stack([np.cos(angles), np.sin(angles)], 1)
    with pytest.raises(ValueError, match="conic"):
        fit_transform(circle, Transform(Q)(circle), "quadratic")
    fit_transform(circle, Transform(A)(circle), "affine")  # the affine is defined by them
    with pytest.raises(ValueError, match="model"):
        fit_transform(image_points(), image_points(), "cubic")


def test_quadratic_inverse_round_trips():
    """inverse(T(p)) == p and T(inverse(q)) == q to well below a thousandth of a pixel, for a
    quadratic that bends by tens of pixels over a 1500 px image; an affine's is exact."""
    t = Transform(Q)
    grid = np.stack(np.meshgrid(np.linspace(0, 1500, 16), np.linspace(0, 1500, 16)), -1)
    p = grid.reshape(-1, 2)
    bend = np.linalg.norm(t(p) - Transform(Q[:, :3])(p), axis=1).max()
    assert 20 < bend < 60  # the test's premise: tens of pixels
    np.testing.assert_allclose(t.inverse(t(p)), p, atol=1e-4)
    np.testing.assert_allclose(t(t.inverse(p)), p, atol=1e-4)
    np.testing.assert_allclose(Transform(A).inverse(apply_affine(A, p)), p, atol=1e-9)


def test_compose_puts_affine_frames_on_either_side():
    """compose(left, right) maps p to left(T(right(p))) for both models; for an affine its matrix
    is left @ M @ right; either side may be left out."""
    p = image_points(20)
    for matrix in (A, Q):
        t = Transform(matrix)
        both = t.compose(LEFT, RIGHT)
        assert both.model == t.model
        expected = apply_affine(LEFT, t(apply_affine(RIGHT, p)))
        np.testing.assert_allclose(both(p), expected, rtol=1e-12, atol=1e-9)
        left_only, right_only = t.compose(LEFT), t.compose(None, RIGHT)
        np.testing.assert_allclose(left_only(p), apply_affine(LEFT, t(p)), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(right_only(p), t(apply_affine(RIGHT, p)), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(
        Transform(A).compose(LEFT, RIGHT).matrix, (LEFT @ to3x3(A) @ RIGHT)[:2]
    )


def test_jacobian_matches_finite_differences():
    """jacobian(p)[:, i, j] = d(output i) / d(input j): central differences agree for the
    quadratic (it varies over the image) and the affine (its linear part everywhere)."""
    p, h = image_points(20), 1e-3
    for matrix in (A, Q):
        t = Transform(matrix)
        differences = np.stack(
            [(t(p + [h, 0]) - t(p - [h, 0])) / (2 * h), (t(p + [0, h]) - t(p - [0, h])) / (2 * h)],
            -1,
        )
        np.testing.assert_allclose(t.jacobian(p), differences, atol=1e-8)
    jac = Transform(Q).jacobian(p)
    assert np.abs(jac - jac[:1]).max() > 1e-3  # it does vary: the test can tell


def test_local_inverse_is_the_inverse_to_first_order():
    """local_inverse(q): an affine exact at q (it maps q to inverse(q)) and, 2.5 px away, within
    1e-4 px of the inverse, where the global affine part misses by tens of pixels."""
    t = Transform(Q)
    q = t(image_points(20))
    local = t.local_inverse(q)
    assert local.shape == (20, 3, 3)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", local[:, :2, :2], q) + local[:, :2, 2],
                               t.inverse(q), atol=1e-6)  # fmt: skip
    near = q + [1.5, -2.0]
    mapped = np.einsum("nij,nj->ni", local[:, :2, :2], near) + local[:, :2, 2]
    assert np.abs(mapped - t.inverse(near)).max() < 1e-3
    affine_part = apply_affine(np.linalg.inv(to3x3(Q[:, :3])), near)
    assert np.abs(affine_part - t.inverse(near)).max() > 10
    np.testing.assert_allclose(Transform(A).local_inverse(q[:2]), [np.linalg.inv(to3x3(A))] * 2)


def textured(shape=(300, 400), seed=0):
    """Smooth random texture over the whole 0-255 range (gradients of tens of grey levels per px
    at most): bilinear sampling of it is well defined to a fraction of a grey level."""
    noise = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX)


def bilinear(image, points):
    """``image`` sampled at (x, y) ``points`` (inside it) by bilinear interpolation, in float."""
    x, y = points[:, 0], points[:, 1]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    im = image.astype(np.float64)
    return (im[y0, x0] * (1 - fx) * (1 - fy) + im[y0, x0 + 1] * fx * (1 - fy)
            + im[y0 + 1, x0] * (1 - fx) * fy + im[y0 + 1, x0 + 1] * fx * fy)  # fmt: skip


def test_quadratic_warp_shows_the_moving_image_at_the_inverse():
    """Transform.warp lays the moving image over the fixed one: output pixel q shows moving at
    inverse(q), to within a grey level (bilinear, at pixels whose inverse lies inside moving),
    in an output of the fixed image's shape; the affine part alone would be off by about 10."""
    moving = textured()
    t = Transform([[0.98, 0.03, 12.0, 4e-5, -3e-5, 2e-5], [-0.02, 1.01, -8.0, -2e-5, 5e-5, 3e-5]])
    warped = t.warp(moving, (280, 360))
    assert warped.shape == (280, 360) and warped.dtype == np.uint8
    ys, xs = np.mgrid[5:275:7, 5:355:7].reshape(2, -1)
    q = np.stack([xs, ys], 1).astype(np.float64)
    p = t.inverse(q)
    inside = (p[:, 0] >= 0) & (p[:, 0] <= 398) & (p[:, 1] >= 0) & (p[:, 1] <= 298)
    assert inside.sum() > 1500
    expected = bilinear(moving, p[inside])
    assert np.abs(warped[ys[inside], xs[inside]] - expected).max() <= 1.0
    affine_part = Transform(t.matrix[:, :3]).warp(moving, (280, 360))
    assert np.abs(affine_part[ys[inside], xs[inside]] - expected).mean() > 5.0


def test_affine_warp_is_cv2_warp_affine():
    """An affine Transform.warp is exactly cv2.warpAffine with its matrix (the convention)."""
    moving = textured()
    np.testing.assert_array_equal(
        Transform(A).warp(moving, (280, 360)), cv2.warpAffine(moving, A, (360, 280))
    )


def test_fire_error_with_a_quadratic_is_zero_at_the_points_it_was_fitted_to():
    """fire_error and is_inaccurate take a Transform: a quadratic fitted exactly to control
    points has ~0 error there, while the best affine through them misses by pixels."""
    moving = image_points(12, seed=3, side=1000)
    points = np.hstack([Transform(Q)(moving), moving])  # x_fixed y_fixed x_moving y_moving
    quadratic, _ = fit_transform(moving, points[:, :2], "quadratic")
    assert fire_error(quadratic, points) < 1e-8
    assert fire_error(quadratic.matrix, points) < 1e-8  # its 2x6 matrix alike
    assert not is_inaccurate(quadratic, points)
    affine, _ = fit_transform(moving, points[:, :2], "affine")
    assert fire_error(affine, points) > 1.0
    shifted = Transform(quadratic.matrix + [[0, 0, 30, 0, 0, 0], [0, 0, 40, 0, 0, 0]])
    assert fire_error(shifted, points) == pytest.approx(50.0)
    assert is_inaccurate(shifted, points)  # 50 px everywhere: median > 20
