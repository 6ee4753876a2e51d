"""Classical baselines on a known affine: skimage's retina photograph moved and seen through a
circular aperture, as a fundus camera would. No files are read or written."""

import bends
import cv2
import numpy as np
import pytest

import classical
from common import GreyImage, as_transform, scale_matrix, to3x3

SIDE = 768
BOUND_PX = {"sift": 1.0, "orb": 1.0, "ecc": 1.0}  # mean grid-point error allowed (px); ~0.2 seen


def affine(degrees, scale, tx, ty, centre=(SIDE - 1) / 2):
    """2x3 rotation + scale about the image centre, then a translation."""
    m = cv2.getRotationMatrix2D((centre, centre), degrees, scale)
    m[:, 2] += (tx, ty)
    return m


@pytest.fixture(scope="module")
def retina():
    skimage_data = pytest.importorskip("skimage.data")
    green = skimage_data.retina()[:, :, 1]
    return cv2.resize(green, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def aperture(pixels):
    """Black outside a centred disc, like the fixed aperture of a fundus camera."""
    h, w = pixels.shape
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (w // 2, h // 2), int(0.46 * min(h, w)), 1, -1)
    return pixels * mask


def grey(pixels):
    return GreyImage(np.ascontiguousarray(pixels), pixels.shape, np.eye(3))


def moved(base, fixed_from_moving):
    """The moving photograph: its pixel p shows what the fixed one shows at fixed_from_moving p."""
    warped = cv2.warpAffine(base, fixed_from_moving, (SIDE, SIDE), flags=cv2.WARP_INVERSE_MAP)
    return aperture(warped)


def grid_error(estimate, truth):
    """Mean distance at ~10 moving points inside the aperture whose images are inside it too
    (``estimate`` and ``truth``: Transforms or affine matrices, fixed_from_moving)."""
    estimate, truth = as_transform(estimate), as_transform(truth)
    ys, xs = np.mgrid[0.25:0.76:0.125, 0.25:0.76:0.125].reshape(2, -1) * SIDE
    points = np.stack([xs, ys], 1)
    centre, radius = (SIDE - 1) / 2, 0.4 * SIDE
    inside = np.linalg.norm(points - centre, axis=1) < radius
    inside &= np.linalg.norm(truth(points) - centre, axis=1) < radius
    points = points[inside][:: max(1, inside.sum() // 10)]
    assert len(points) >= 8
    return float(np.linalg.norm(estimate(points) - truth(points), axis=1).mean())


def bending(bend_px, **motion):
    """bends.bending for this file's SIDE."""
    return bends.bending(SIDE, bend_px, **motion)


def bent(base, fixed_from_moving):
    """The moving photograph of a quadratic motion: its pixel p shows what the fixed one shows at
    fixed_from_moving(p). cv2.remap samples base there directly, so the transform is used in the
    direction that Registration.fixed_from_moving maps (moving to fixed), with no inverse."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    where = fixed_from_moving(np.stack([xs.ravel(), ys.ravel()], 1)).astype(np.float32)
    where = where.reshape(SIDE, SIDE, 2)
    return aperture(cv2.remap(base, where[..., 0], where[..., 1], cv2.INTER_LINEAR))


MOTION = {
    "sift": affine(4.0, 1.03, 30.0, -25.0),
    "orb": affine(-3.0, 0.97, -35.0, 20.0),
    "ecc": affine(3.0, 1.02, 20.0, 15.0),
}


@pytest.mark.parametrize("name", ["sift", "orb", "ecc"])
def test_recovers_known_affine(retina, name):
    truth = MOTION[name]
    result = classical.METHODS[name](grey(aperture(retina)), grey(moved(retina, truth)))
    assert result.fixed_from_moving is not None, result.reason
    assert result.fixed_from_moving.model == "affine"  # the default transform
    assert result.fixed_from_moving.matrix.shape == (2, 3)
    assert 0.0 <= result.confidence <= 1.0
    error = grid_error(result.fixed_from_moving, truth)
    assert error < BOUND_PX[name], f"{name}: mean error {error:.2f} px"


def test_sizes_and_decoding_are_undone(retina):
    """A moving file of another size, decoded at half size: the matrix is still in file pixels."""
    truth = affine(4.0, 1.03, 30.0, -25.0)
    crop = moved(retina, truth)[:, 64:]  # non-square file, 768 x 704
    truth = truth @ to3x3(np.array([[1.0, 0, 64], [0, 1, 0]]))  # fixed_from_crop
    half = cv2.resize(crop, (crop.shape[1] // 2, crop.shape[0] // 2), interpolation=cv2.INTER_AREA)
    moving = GreyImage(half, crop.shape, scale_matrix(0.5))
    for name in ("sift", "ecc"):
        result = classical.METHODS[name](grey(aperture(retina)), moving)
        assert result.fixed_from_moving is not None, result.reason
        error = grid_error(result.fixed_from_moving, truth)
        assert error < 2 * BOUND_PX[name], f"{name}: mean error {error:.2f} px"


@pytest.mark.parametrize("name", ["sift", "orb", "ecc"])
def test_unrelated_images_fail_cleanly(retina, name):
    """Retina against textured noise: a failed Registration (or a low-confidence one), no raise."""
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8), (0, 0), 2.0)
    ramp = np.linspace(40, 200, SIDE, dtype=np.float32)[None, :]
    other = aperture(np.clip(0.5 * noise + ramp - 64, 0, 255).astype(np.uint8))
    result = classical.METHODS[name](grey(aperture(retina)), grey(other))
    if name in ("sift", "orb"):
        assert result.fixed_from_moving is None and result.reason, result
    elif result.fixed_from_moving is None:
        assert result.reason and result.confidence == 0.0
    else:
        assert result.confidence < 0.5, result


@pytest.mark.parametrize("name", ["sift", "orb", "ecc"])
def test_flat_images_do_not_raise(name):
    """No texture (no keypoints, no gradients): features fail as a value; ECC may keep the identity
    (right for identical images) or fail; nothing raises."""
    flat = grey(aperture(np.full((200, 300), 120, np.uint8)))
    result = classical.METHODS[name](flat, flat)
    if result.fixed_from_moving is None:
        assert result.reason and result.confidence == 0.0
    else:
        assert name == "ecc"
        np.testing.assert_allclose(result.fixed_from_moving.matrix, np.eye(3)[:2], atol=1e-3)


def test_testing_has_a_flag_for_each_operating_point_with_classical_defaults():
    """Testing.py's --sift-side, --orb-features... reach the method, with classical.py's
    defaults: ORB_SIDE is register_orb's ``side``. TRANSFORM is Testing.py's setting for every
    method (not a classical.py constant): its default is each method's ``transform`` default,
    and --transform reaches every classical method."""
    import inspect

    import Testing
    from common import cli

    for name, keys in Testing.CLASSICAL_SETTINGS.items():
        parameters = inspect.signature(classical.METHODS[name]).parameters
        taken = list(parameters)[2:]  # after the images
        args = cli(vars(Testing), "", [])
        assert sorted(Testing.method_settings(name, args)) == sorted(taken), name
        assert "TRANSFORM" in keys, name
        for key in keys:
            if key == "TRANSFORM":  # shared by all methods: the function's own default
                assert Testing.TRANSFORM == parameters["transform"].default == "affine", name
                continue
            assert getattr(Testing, key) == getattr(classical, key), key
        quadratic = cli(vars(Testing), "", ["--transform", "quadratic"])
        _, register = Testing.make_method(name, quadratic)
        assert register.keywords["transform"] == "quadratic", name
    args = cli(vars(Testing), "", ["--orb-side", "300", "--orb-features", "7", "--orb-levels", "2"])
    _, register = Testing.make_method("orb", args)
    assert register.keywords == {"side": 300, "features": 7, "levels": 2, "transform": "affine"}


def test_the_operating_point_changes_the_result(retina):
    """ORB with 7 keypoints cannot register what it registers with its default 1000, and SIFT
    at a third of its working size is coarser: the settings are used, not just accepted."""
    truth = MOTION["orb"]
    fixed, moving = grey(aperture(retina)), grey(moved(retina, truth))
    few = classical.register_orb(fixed, moving, features=7)
    assert few.fixed_from_moving is None and "too few" in few.reason
    small = classical.register_sift(fixed, moving, side=160)
    full = classical.register_sift(fixed, moving)
    assert grid_error(full.fixed_from_moving, truth) < grid_error(small.fixed_from_moving, truth)


def test_every_method_gets_the_same_threads_and_numpys_blas_one():
    """Testing.set_threads: THREADS for OpenCV, one thread for NumPy's BLAS (and OpenCV's own
    copy of OpenBLAS), whose second thread spins after each small product and slowed the net."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import Testing

    before = cv2.getNumThreads()
    with threadpool_limits(limits=2, user_api="blas"):  # the limits found are restored after
        Testing.set_threads(2, tensorflow=False)
        assert cv2.getNumThreads() == 2
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and set(blas) == {1}
    cv2.setNumThreads(before)


BEND_PX = 10.0  # the bent pairs' edges move this much more than the affine part says
QUADRATIC_BOUND_PX = 0.5  # mean grid error allowed with transform quadratic; 0.05-0.16 seen


@pytest.mark.parametrize("name", ["sift", "orb"])
def test_quadratic_recovers_a_bent_pair_that_the_affine_cannot(retina, name):
    """The retina under a known quadratic (edges bent by BEND_PX): with transform quadratic the
    features' method returns a quadratic close to it; the affine, the default, misses by pixels
    (measured: sift 0.04 vs 2.2 px, orb 0.16 vs 3.3 px)."""
    truth = bending(BEND_PX)
    fixed, moving = grey(aperture(retina)), grey(bent(retina, truth))
    register = classical.METHODS[name]
    quadratic = register(fixed, moving, transform="quadratic")
    affine = register(fixed, moving)
    assert quadratic.fixed_from_moving is not None, quadratic.reason
    assert quadratic.fixed_from_moving.model == "quadratic"
    assert quadratic.fixed_from_moving.matrix.shape == (2, 6)
    assert affine.fixed_from_moving.model == "affine"
    assert 0.0 <= quadratic.confidence <= 1.0
    quadratic_error = grid_error(quadratic.fixed_from_moving, truth)
    affine_error = grid_error(affine.fixed_from_moving, truth)
    assert affine_error > 1.5, f"{name}: the bend is too small to tell ({affine_error:.2f} px)"
    assert quadratic_error < QUADRATIC_BOUND_PX, f"{name}: mean error {quadratic_error:.2f} px"
    assert quadratic_error < affine_error / 4


def test_a_quadratic_is_in_file_pixels_when_the_moving_file_is_decoded_smaller(retina):
    """As test_sizes_and_decoding_are_undone, for the quadratic: a non-square moving file decoded
    at half size; the quadratic maps the file's pixels (its frames are composed on either side)."""
    truth = bending(BEND_PX)
    crop = bent(retina, truth)[:, 64:]  # 768 x 704: crop pixel p is bent pixel p + (64, 0)
    truth = truth.compose(right=np.array([[1.0, 0, 64], [0, 1, 0], [0, 0, 1]]))  # fixed_from_crop
    half = cv2.resize(crop, (crop.shape[1] // 2, crop.shape[0] // 2), interpolation=cv2.INTER_AREA)
    moving = GreyImage(half, crop.shape, scale_matrix(0.5))
    result = classical.register_sift(grey(aperture(retina)), moving, transform="quadratic")
    assert result.fixed_from_moving is not None, result.reason
    assert result.fixed_from_moving.model == "quadratic"
    error = grid_error(result.fixed_from_moving, truth)
    assert error < 2 * QUADRATIC_BOUND_PX, f"mean error {error:.2f} px"


def test_too_few_inliers_for_a_quadratic_leave_the_affine(retina, monkeypatch):
    """With fewer RANSAC inliers than QUADRATIC_INLIERS, transform quadratic returns RANSAC's
    affine itself (a quadratic through a handful of matches would fit their noise)."""
    truth = bending(BEND_PX)
    fixed, moving = grey(aperture(retina)), grey(bent(retina, truth))
    affine = classical.register_sift(fixed, moving)
    monkeypatch.setattr(classical, "QUADRATIC_INLIERS", 10**6)
    kept = classical.register_sift(fixed, moving, transform="quadratic")
    assert kept.fixed_from_moving.model == "affine"
    np.testing.assert_array_equal(kept.fixed_from_moving.matrix, affine.fixed_from_moving.matrix)
    assert kept.confidence == affine.confidence


def test_ecc_returns_an_affine_when_asked_for_a_quadratic(retina):
    """OpenCV's ECC aligns under an affine only: transform quadratic gives the same affine (model
    affine), not a failure."""
    truth = MOTION["ecc"]
    fixed, moving = grey(aperture(retina)), grey(moved(retina, truth))
    result = classical.register_ecc(fixed, moving, transform="quadratic")
    assert result.fixed_from_moving is not None, result.reason
    assert result.fixed_from_moving.model == "affine"
    np.testing.assert_array_equal(
        result.fixed_from_moving.matrix,
        classical.register_ecc(fixed, moving).fixed_from_moving.matrix,
    )
    assert grid_error(result.fixed_from_moving, truth) < BOUND_PX["ecc"]
