"""The network's confidence is low exactly when its result is bad, and a wrong guess is retried."""

import bends
import cv2
import numpy as np
import pytest
from skimage import data

import Network
import registrar as procedure
from common import (
    GreyImage,
    Transform,
    apply_affine,
    fire_error,
    fit_transform,
    fov_mask,
    translation,
)

MODEL = "models/fundusreg.keras"
SIDE = 768
BAD_PX = 25.0  # as Testing.BAD_PX: past it a registration adds nothing to the AUC


@pytest.fixture(scope="module")
def model():
    return Network.load_network(MODEL)


@pytest.fixture(scope="module")
def registrar(model):
    return procedure.NetRegistrar(model)


@pytest.fixture(scope="module")
def retina():
    return cv2.resize(data.retina()[:, :, 1], (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def grey(pixels):
    return GreyImage(pixels, pixels.shape, np.eye(3))


def moved(fixed, moving_from_fixed):
    """The fixed image seen after a motion, and control points (fixed x y, moving x y) in the
    field of view of both."""
    moving = cv2.warpAffine(fixed, moving_from_fixed[:2], (SIDE, SIDE), flags=cv2.INTER_LINEAR)
    mask = fov_mask(fixed) > 0
    grid = np.stack(np.meshgrid(np.arange(96, SIDE, 96), np.arange(96, SIDE, 96)), -1)
    grid = grid.reshape(-1, 2).astype(np.float64)
    inside = [mask[int(y), int(x)] for x, y in grid]
    points = grid[inside]
    return moving, np.hstack([points, apply_affine(moving_from_fixed, points)])


def about_centre(degrees, scale=1.0, mirror=False, shift=(0.0, 0.0)):
    m = np.vstack([cv2.getRotationMatrix2D((SIDE / 2 - 0.5,) * 2, degrees, scale), [0, 0, 1]])
    if mirror:
        m = m @ np.array([[-1.0, 0, SIDE - 1], [0, 1, 0], [0, 0, 1]])
    m[:2, 2] += shift
    return m


@pytest.mark.parametrize(
    "motion",
    [
        about_centre(8, 1.05, shift=(20, -12)),  # within the network's training range
        about_centre(-5, 0.95, shift=(-60, 30)),
        about_centre(180),  # beyond it: the network cannot undo a half turn
        about_centre(0, mirror=True),  # no rotation, scale or shift gives a mirror image
    ],
    ids=["small", "large", "half-turn", "mirror"],
)
def test_confidence_is_low_exactly_when_the_result_is_bad(registrar, retina, motion):
    moving, points = moved(retina, motion)
    result = registrar.register(grey(retina), grey(moving))
    error = fire_error(result.fixed_from_moving, points)
    assert (error > BAD_PX) == (result.confidence < 0.5), (error, result.confidence)


def test_unrelated_image_gets_low_confidence(registrar, retina):
    """A moving image of another 'eye' (smoothed noise through the same aperture)."""
    noise = np.random.default_rng(3).integers(0, 255, (SIDE, SIDE), dtype=np.uint8)
    other = cv2.GaussianBlur(noise, (0, 0), 4)
    other = cv2.normalize(other, None, 0, 255, cv2.NORM_MINMAX) & fov_mask(retina)
    result = registrar.register(grey(retina), grey(other))
    assert result.confidence < 0.5


def test_a_wrong_network_guess_is_retried_from_the_identity(model, retina, monkeypatch):
    """Small motion, but the network's guess is 60 px off (at the coarse 64 px view: 5 px): the
    patches disagree with it, the fine stage reruns from the identity and is right."""
    registrar = procedure.NetRegistrar(model)
    moving, points = moved(retina, about_centre(2, shift=(6, -4)))
    wrong = np.array([[[1.0, 0, 5], [0, 1, -5], [0, 0, 1]]])  # (1, 3, 3), as predict returns
    monkeypatch.setattr(registrar, "predict", lambda fixed, moving: wrong)
    result = registrar.register(grey(retina), grey(moving))
    assert fire_error(result.fixed_from_moving, points) < 2.0
    assert result.confidence >= 0.5
    no_retry = procedure.NetRegistrar(model, retry_below=0.0)
    monkeypatch.setattr(no_retry, "predict", lambda fixed, moving: wrong)
    unretried = no_retry.register(grey(retina), grey(moving))
    assert unretried.confidence < 0.5  # the wrong start did fail, and said so
    assert fire_error(unretried.fixed_from_moving, points) > BAD_PX


TRUTH = np.array([[1.01, 0.02, 1.5], [-0.02, 0.99, -2.0], [0, 0, 1]])


def consistent_patches(seed, count):
    """``count`` 64 px patches at random corners, each with the translation TRUTH gives its
    centre (what phase correlation measures); and the random generator, to go on with."""
    rng = np.random.default_rng(seed)
    corners = [(int(x), int(y)) for x, y in rng.integers(0, 320, (count, 2))]
    centres = np.asarray(corners, np.float64) + 32
    local = np.tile(np.eye(3), (count, 1, 1))
    local[:, :2, 2] = apply_affine(TRUTH, centres) - centres
    return corners, local, rng


def test_patch_agreement_separates_consistent_from_stray_patches():
    """_fit_patch_motions: the residual of each patch is its distance from the fitted affine."""
    corners, local, _ = consistent_patches(0, 20)
    local[:4, :2, 2] += [[15, 0], [0, -12], [9, 9], [-20, 4]]  # four stray patches
    fit, residual, _ = procedure._fit_patch_motions(local, corners, 64, "trimmed")
    assert fit.model == "affine"
    np.testing.assert_allclose(fit.matrix, TRUTH[:2], atol=1e-4)  # float32 points
    assert np.all(residual[:4] > 8) and np.all(residual[4:] < 1e-3)


def test_weights_pull_the_fit_towards_the_trusted_patches():
    """_fit_patch_motions with weights: patches of low weight (plain background: noisy shifts)
    move the fit much less than with equal weights."""
    corners, local, rng = consistent_patches(1, 40)
    local[20:, :2, 2] += rng.normal(0, 1.0, (20, 2))  # within the trimming's reach: kept
    weights = np.r_[np.ones(20), np.full(20, 1e-4)]
    centres = np.asarray(corners, np.float64) + 32
    errors = []
    for w in (None, weights):
        fit, _, _ = procedure._fit_patch_motions(local, corners, 64, "trimmed", w)
        errors.append(np.abs(fit(centres) - apply_affine(TRUTH, centres)).max())
    assert errors[0] > 0.1 and errors[1] < errors[0] / 20


def test_phase_peak_is_high_on_vessels_and_low_on_background(registrar, retina):
    """The correlation peak, whose square is a patch's weight: high where both (flattened)
    patches show the same vessels, shifted; low where they show unrelated noise."""
    vessels = retina[352:416, 300:364]
    shifted = np.roll(retina, (2, 3), axis=(0, 1))[352:416, 300:364]
    noise = np.random.default_rng(2).normal(128, 3, (2, 64, 64)).clip(0, 255).astype(np.uint8)
    fixed, moving = np.stack([vessels, noise[0]]), np.stack([shifted, noise[1]])
    local, peaks = registrar.phase(fixed, moving, flatten=True)
    np.testing.assert_allclose(local[0, :2, 2], [-3, -2], atol=0.3)  # fixed from moving
    assert peaks[0] > 0.8 and (peaks[1] / peaks[0]) ** 2 < 0.1  # weighs 10x less at least


def test_retry_order_and_stop(model, retina, monkeypatch):
    """Low confidence: the patches from the identity (no network), then the network from the
    shifted starts (one batch), until one is confident; the most confident result is kept, and
    only it gets the passes finer than CONFIDENCE_SIZE."""
    registrar = procedure.NetRegistrar(model)
    network, calls, tried, finer = registrar._network, [], [], []
    scripted = iter([0.1, 0.2, 0.3, 0.9, 1.0])

    def spy(coarse, masks, starts, passes):
        calls.append(([s[:2, 2].tolist() for s in starts], passes))
        return network(coarse, masks, starts, passes)

    def fine(fine, t, sizes):
        if sizes == registrar._finer:
            finer.append(t)
            return t, 0.0, False, None
        tried.append((t, sizes))
        diagonal = Transform(np.diag([len(tried), len(tried), 1.0]))  # tells them apart
        return diagonal, next(scripted), False, None

    monkeypatch.setattr(registrar, "_network", spy)
    monkeypatch.setattr(registrar, "_fine", fine)
    result = registrar.register(grey(retina), grey(retina))
    step = procedure.RETRY_SHIFT * registrar.size
    passes = procedure.COARSE_ITERATIONS
    assert calls[:2] == [([[0, 0]], passes), ([[0, 0]], 0)]
    assert calls[2][1] == passes and calls[2][0][:2] == [[step, 0], [-step, 0]]
    assert len(calls) == 3 and len(calls[2][0]) == 8  # the turned starts were never needed
    assert len(tried) == 4 and result.confidence == 0.9
    assert all(isinstance(t, Transform) for t, _ in tried)
    # the first estimate's passes up to CONFIDENCE_SIZE; a retry's begin at RETRY_SIZE
    assert [sizes for _, sizes in tried] == [registrar._judging] + [registrar._retry_sizes] * 3
    assert registrar._retry_sizes == [procedure.RETRY_SIZE, *registrar._judging]
    assert len(finer) == 1 and finer[0].matrix[0, 0] == 4  # the fourth estimate's, refined once
    assert result.fixed_from_moving.matrix[0, 0] == pytest.approx(4.0)


def test_a_batch_of_starts_gives_the_estimates_of_one_start_at_a_time(model, retina):
    """The retry runs the network from its starts in batches; without the zoomed passes (whose
    crops move by a whole pixel where a centre rounds the other way) the estimates are those of
    one start at a time, to a hundredth of a pixel."""
    registrar = procedure.NetRegistrar(model, zoom_iterations=0)
    pyramid = procedure.Pyramid(grey(retina).pixels)
    coarse = ([pyramid.view(registrar.size)] * 2, [])
    starts = registrar._starts[:3]
    batch = registrar._network(coarse, None, starts, 1)
    for start, estimate in zip(starts, batch):
        one = registrar._network(coarse, None, [start], 1)[0]
        np.testing.assert_allclose(one, estimate, atol=0.01)


@pytest.mark.parametrize(
    "motion",
    [about_centre(-15, 1.0, shift=(230, -90)), about_centre(20, 1.05, shift=(-250, 60))],
    ids=["30%-shift", "33%-shift-20deg"],
)
def test_large_motion_is_registered(registrar, retina, motion):
    """A third of the side and 15-20 degrees (real P pairs move 35-45 %): beyond the first
    model's range, within this one's. Measured: 0.04 and 0.06 px, confidence 1.0."""
    moving, points = moved(retina, motion)
    result = registrar.register(grey(retina), grey(moving))
    assert fire_error(result.fixed_from_moving, points) < 1.0
    assert result.confidence >= 0.5


@pytest.mark.parametrize("patches, trusted", [(5, False), (8, True), (40, True)])
def test_a_few_agreeing_patches_are_trusted_only_past_a_floor(
    registrar, retina, monkeypatch, patches, trusted
):
    """Agreement is counted out of at least a quarter of FINE_PATCHES: 8 patches that agree (a
    40 % overlap at 384 px holds about that many) are trusted, 5 are not."""
    corners = [(32 * (k % 8) + 40, 32 * (k // 8) + 40) for k in range(patches)]
    monkeypatch.setattr(procedure, "_patch_corners", lambda *args: corners)
    pyramids = procedure.Pyramid(retina), procedure.Pyramid(retina)
    mask = np.ones((192, 192), bool), np.diag([0.25, 0.25, 1.0])
    _, agreement, _, _ = registrar._fine_pass(pyramids, (mask, mask), Transform(np.eye(3)), 384)
    assert (agreement >= 0.5) == trusted


def test_patches_larger_than_half_a_pass_are_cut_to_fit(model, retina):
    """--fine-patch 128: the 192 px pass uses 96 px patches (and a window of their size)."""
    registrar = procedure.NetRegistrar(model, fine_patch=128, fine_patches=12)
    moving, points = moved(retina, about_centre(8, 1.05, shift=(20, -12)))
    result = registrar.register(grey(retina), grey(moving))
    assert fire_error(result.fixed_from_moving, points) < 1.0 and result.confidence >= 0.5


def test_a_finer_pass_whose_patches_disagree_is_not_kept(registrar, retina, monkeypatch):
    """Past CONFIDENCE_SIZE, a pass is kept only where KEEP_FINER_ABOVE of its patches agree (a
    blurred pair has too little texture for small patches at full resolution); the confidence
    stays that of the CONFIDENCE_SIZE pass."""
    agreements = {192: 0.9, 384: 0.8, 768: 0.2}
    seen = []

    def fine_pass(pyramids, masks, t, size):
        seen.append(size)
        return Transform(np.diag([size, size, 1.0])), agreements[size], 0.0, None  # tells apart

    monkeypatch.setattr(registrar, "_fine_pass", fine_pass)
    result = registrar.register(grey(retina), grey(retina))
    assert seen == [192, 384, 768]
    assert result.fixed_from_moving.matrix[0, 0] == pytest.approx(384)  # the 768 was dropped
    assert result.confidence == pytest.approx(0.8)
    agreements[768] = 0.6
    seen.clear()
    kept = registrar.register(grey(retina), grey(retina))
    assert kept.fixed_from_moving.matrix[0, 0] == pytest.approx(768) and kept.confidence == 0.8


def test_a_pass_that_moves_patches_far_is_repeated_once(registrar, retina, monkeypatch):
    """A pass up to CONFIDENCE_SIZE that moves a patch by more than REPEAT_ABOVE of its side runs
    once more, from its own result; a finer pass, or one that moves little, does not."""
    moves = {192: [0.5, 0.4], 384: [0.01], 768: [0.9]}
    seen = []

    def fine_pass(pyramids, masks, t, size):
        seen.append((size, t.matrix[0, 0]))
        counted = Transform(np.diag([t.matrix[0, 0] + 1, 1.0, 1.0]))  # counts the passes
        return counted, 1.0, moves[size].pop(0), None

    monkeypatch.setattr(registrar, "_fine_pass", fine_pass)
    monkeypatch.setattr(registrar, "zoom_iterations", 0)
    monkeypatch.setattr(registrar, "coarse_iterations", 0)
    result = registrar.register(grey(retina), grey(retina))
    assert [size for size, _ in seen] == [192, 192, 384, 768]  # once, even if it still moves far
    assert [start for _, start in seen] == [1, 2, 3, 4]  # each pass from the one before
    assert result.fixed_from_moving.matrix[0, 0] == pytest.approx(5)


def test_a_repeated_pass_reaches_what_one_pass_falls_short_of(model, retina):
    """A 48 px shift at 768 px is 24 px in the 384 px pass: one pass of phase correlation falls
    short of it (the window weakens the shifted content), a repeated one does not. Measured:
    0.69 px short once, 0.08 px repeated."""
    moving, points = moved(retina, about_centre(0, 1.0, shift=(40, -28)))
    errors = []
    for repeat_above in (0.0, procedure.REPEAT_ABOVE):
        registrar = procedure.NetRegistrar(
            model, coarse_iterations=0, fine_sizes="384", repeat_above=repeat_above
        )
        result = registrar.register(grey(retina), grey(moving))
        errors.append(fire_error(result.fixed_from_moving, points))
    assert errors[0] > 0.4 and errors[1] < 0.2


def test_the_overlap_centre_is_where_both_fields_of_view_see_the_retina():
    """Two square fields of view, the moving one 200 px to the right of the fixed one: they
    overlap on the fixed image's right part, x in [200, 768)."""
    mask = np.ones((192, 192), bool), np.diag([0.25, 0.25, 1.0])  # 768 px images
    centre = procedure._overlap_centre(
        (mask, mask), np.array([[1, 0, 200], [0, 1, 0], [0, 0, 1.0]])
    )
    np.testing.assert_allclose(centre, [484, 384], atol=4)
    far = np.array([[1, 0, 900], [0, 1, 0], [0, 0, 1.0]])
    assert procedure._overlap_centre((mask, mask), far) is None


# The fields of view of the _patch_corners tests: a 384 px image, its own view (image_from_view =
# identity), and a disc of radius 90 px in its 192 px mask (mask_from_image halves).
PATCH_VIEW, PATCH = 384, 64
DISC = np.hypot(*(np.mgrid[:192, :192] - 95.5)) <= 90
DISC_MASKS = ((DISC, np.diag([0.5, 0.5, 1.0])),) * 2


def assert_patches_inside_both_fields_of_view(corners, a):
    """The four corners and the centre of every patch lie in the fixed field of view and,
    carried by ``a`` (fixed_from_moving), in the moving one."""
    probes = np.array([[0, 0], [PATCH - 1, 0], [0, PATCH - 1], [PATCH - 1] * 2, [PATCH / 2] * 2])
    for corner in corners:
        fixed = probes + corner
        for points in (fixed, apply_affine(np.linalg.inv(a), fixed)):
            x, y = np.rint(points * 0.5).astype(int).T
            assert (x >= 0).all() and (x < 192).all() and (y >= 0).all() and (y < 192).all()
            assert DISC[y, x].all()


def test_patches_lie_in_both_fields_of_view_outermost_first():
    """_patch_corners: the four corners and the centre of every patch lie in the fixed field of
    view and, carried by the estimate, in the moving one; no more patches than asked, the
    outermost first; a moved field of view leaves fewer."""
    size, patch, masks = PATCH_VIEW, PATCH, DISC_MASKS
    a = np.array([[1, 0, 60], [0, 1, -30], [0, 0, 1.0]])  # fixed_from_moving
    corners = procedure._patch_corners(masks, Transform(a), np.eye(3), size, patch, 20)
    assert 10 <= len(corners) <= 20
    assert_patches_inside_both_fields_of_view(corners, a)
    outward = np.abs(np.asarray(corners) - (size - patch) / 2).sum(axis=1)
    assert (np.diff(outward) <= 0).all()
    everywhere = procedure._patch_corners(masks, Transform(np.eye(3)), np.eye(3), size, patch, 100)
    moved = procedure._patch_corners(masks, Transform(a), np.eye(3), size, patch, 100)
    assert len(moved) < len(everywhere)


def test_a_small_overlap_is_measured_by_a_denser_grid():
    """Where fewer than DENSE_BELOW of the patches asked for fit the grid, it is made about twice
    as dense: a 40 % overlap at 384 px holds 9 patches of the regular grid and 29 of the denser
    one, every one inside both fields of view; a large overlap keeps its regular grid."""
    size, patch, masks = PATCH_VIEW, PATCH, DISC_MASKS
    apart = np.array([[1, 0, 180], [0, 1, 0], [0, 0, 1.0]])  # discs 90 mask px apart: 39 % overlap
    apart_t = Transform(apart)
    regular = procedure._patch_corners(masks, apart_t, np.eye(3), size, patch, 40, dense_below=0)
    denser = procedure._patch_corners(masks, apart_t, np.eye(3), size, patch, 40)
    assert procedure.DENSE_BELOW == 0.5 and len(regular) == 9 and len(denser) == 29
    assert_patches_inside_both_fields_of_view(denser, apart)
    assert len(np.unique(np.diff(np.unique(denser[:, 1])))) <= 2  # still a regular grid
    assert np.diff(np.unique(denser[:, 1])).max() < np.diff(np.unique(regular[:, 1])).min()
    near = Transform(np.array([[1, 0, 40], [0, 1, 0], [0, 0, 1.0]]))
    np.testing.assert_array_equal(
        procedure._patch_corners(masks, near, np.eye(3), size, patch, 40),
        procedure._patch_corners(masks, near, np.eye(3), size, patch, 40, dense_below=0),
    )


def test_the_retry_starts_are_shifted_turned_and_both(model, retina, monkeypatch):
    """When nothing is confident: 8 shifted starts, 2 turned by +-RETRY_ROTATION about the
    view's centre, then the 16 combinations; the most confident result is kept."""
    registrar = procedure.NetRegistrar(model)
    network, starts, tried = registrar._network, [], []

    def spy(coarse, masks, batch, passes):
        starts.extend(batch)
        return network(coarse, masks, batch, passes)

    def fine(fine, t, sizes):
        tried.append(t)
        return t, 0.1 if len(tried) != 20 else 0.3, False, None

    monkeypatch.setattr(registrar, "_network", spy)
    monkeypatch.setattr(registrar, "_fine", fine)
    result = registrar.register(grey(retina), grey(retina))
    assert len(starts) == 2 + 8 + 2 + 16 and len(tried) == len(starts) + 1  # + the finer passes
    assert result.confidence == 0.3
    centre = np.array([(registrar.size - 1) / 2] * 2)
    for start, degrees in (
        (starts[10], procedure.RETRY_ROTATION),
        (starts[11], -procedure.RETRY_ROTATION),
    ):
        assert np.degrees(np.arctan2(start[1, 0], start[0, 0])) == pytest.approx(degrees)
        np.testing.assert_allclose(apply_affine(start, centre[None]), centre[None], atol=1e-9)
    np.testing.assert_allclose(starts[12], starts[2] @ starts[10])  # first shift, first turn


# ----------------------------------------------------------------------------------------------
# transform quadratic: the curved retina, and the confidence of an affine that cannot bend


def bending(bend_px, **motion):
    """bends.bending for this file's SIDE."""
    return bends.bending(SIDE, bend_px, **motion)


def bent(fixed, fixed_from_moving):
    """The fixed image seen after a quadratic motion: the moving image's pixel p shows the fixed
    one at fixed_from_moving(p) (cv2.remap samples it there: the transform is used in the
    direction Registration.fixed_from_moving maps, moving to fixed); and control points (fixed
    x y, moving x y) on a grid of moving pixels that both fields of view see."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    where = fixed_from_moving(np.stack([xs.ravel(), ys.ravel()], 1)).astype(np.float32)
    where = where.reshape(SIDE, SIDE, 2)
    moving = cv2.remap(fixed, where[..., 0], where[..., 1], cv2.INTER_LINEAR)
    grid = np.stack(np.meshgrid(np.arange(96, SIDE, 96), np.arange(96, SIDE, 96)), -1)
    grid = grid.reshape(-1, 2).astype(np.float64)
    mapped = fixed_from_moving(grid)
    mask = fov_mask(fixed) > 0
    inside = [
        0 <= x < SIDE and 0 <= y < SIDE and mask[int(y), int(x)] and mask[int(v), int(u)]
        for (x, y), (u, v) in zip(mapped, grid)
    ]
    return moving, np.hstack([mapped[inside], grid[inside]])


BEND_PX = 8.0  # the edges bend this much: the best affine misses by about 2.5 px on average


@pytest.fixture(scope="module")
def bent_pair(retina):
    moving, points = bent(retina, bending(BEND_PX))
    assert len(points) >= 30
    return grey(retina), grey(moving), points


def test_transform_quadratic_registers_a_bent_pair_better_than_the_affine(
    model, registrar, bent_pair
):
    """NetRegistrar(transform="quadratic") on the retina bent by a known quadratic: a quadratic
    result, confident, with a control-point error far below the default affine's on the same
    pair (measured: 0.05 px against 2.5 px)."""
    fixed, moving, points = bent_pair
    quadratic = procedure.NetRegistrar(model, transform="quadratic").register(fixed, moving)
    affine = registrar.register(fixed, moving)
    assert quadratic.fixed_from_moving.model == "quadratic"
    assert affine.fixed_from_moving.model == "affine"
    quadratic_error = fire_error(quadratic.fixed_from_moving, points)
    affine_error = fire_error(affine.fixed_from_moving, points)
    assert affine_error > 1.5, affine_error  # the premise: an affine cannot follow the bend
    assert quadratic_error < 0.5 and quadratic_error < affine_error / 4, (
        quadratic_error,
        affine_error,
    )
    assert quadratic.confidence >= 0.5


def test_an_affine_that_misses_the_patches_quadratic_by_misfit_px_is_not_confident(
    model, bent_pair
):
    """MISFIT_PX: an affine result further than misfit_px (on average) from the quadratic that the
    same patches fit has its confidence capped below 0.5, the further the lower; with a large
    misfit_px the same pair is confident. The cap changes the confidence, never the matrix."""
    fixed, moving, points = bent_pair
    results = {
        misfit: procedure.NetRegistrar(model, misfit_px=misfit).register(fixed, moving)
        for misfit in (1.0, 2.0, 1000.0)
    }
    assert all(r.fixed_from_moving.model == "affine" for r in results.values())
    assert results[1000.0].confidence >= 0.5
    assert results[2.0].confidence < 0.5
    assert results[1.0].confidence < results[2.0].confidence
    for r in results.values():
        np.testing.assert_array_equal(
            r.fixed_from_moving.matrix, results[1000.0].fixed_from_moving.matrix
        )


def test_an_unknown_transform_is_refused(model):
    """A model other than affine or quadratic is a ValueError (Testing.py: exit 2, one line)."""
    with pytest.raises(ValueError, match="transform must be affine or quadratic"):
        procedure.NetRegistrar(model, transform="cubic")


def test_a_fine_pass_returns_the_quadratic_it_fitted_and_did_not_take(model, retina, bent_pair):
    """_fine_pass on a bent pair from the best affine: with transform affine it returns an affine
    and, fourth, the quadratic that the same patches fit (for MISFIT_PX), close to the truth;
    with transform quadratic it takes that quadratic itself and returns it fourth too (its own
    misfit is nought)."""
    fixed, moving, _ = bent_pair
    truth = bending(BEND_PX)
    pyramids = procedure.Pyramid(fixed.pixels), procedure.Pyramid(moving.pixels)
    masks = []
    for pyramid in pyramids:
        view, view_from_image = pyramid.view(procedure.MASK_SIZE)
        masks.append((fov_mask(view) > 0, view_from_image))
    grid = np.stack(np.meshgrid(np.linspace(150, 618, 9), np.linspace(150, 618, 9)), -1)
    grid = grid.reshape(-1, 2)
    start, _ = fit_transform(grid, truth(grid))  # the best affine: 1 px off the truth here
    affine = procedure.NetRegistrar(model)
    t, agreement, moved, curved = affine._fine_pass(pyramids, masks, start, 384)
    assert t.model == "affine" and curved is not None and curved.model == "quadratic"
    assert np.abs(curved(grid) - truth(grid)).mean() < 0.5
    assert np.abs(t(grid) - truth(grid)).mean() > 0.75
    assert 0.0 <= agreement <= 1.0 and moved >= 0.0
    quadratic = procedure.NetRegistrar(model, transform="quadratic")
    taken, agreement, _, same = quadratic._fine_pass(pyramids, masks, start, 384)
    assert taken.model == "quadratic" and same is taken and agreement >= 0.5
    np.testing.assert_allclose(taken.matrix, curved.matrix)


def test_misfit_is_the_mean_distance_where_both_fields_of_view_see_the_retina():
    """_misfit: how far an estimate is from the quadratic (image pixels), averaged over the
    overlap of both fields of view under the estimate only. Two 768 px images seen whole: a
    constant 5 px apart is 5 px; moved 600 px apart, a difference of 1 % of the moving x is
    about 0.8 px there (x from 0 to 168), not the 2.5 px it averages over the whole image."""
    mask = np.ones((192, 192), bool), np.diag([0.25, 0.25, 1.0])
    identity = Transform(np.eye(3))
    shifted = Transform([[1, 0, 3, 0, 0, 0], [0, 1, 4, 0, 0, 0]])
    assert procedure._misfit((mask, mask), identity, shifted) == pytest.approx(5.0)
    apart = Transform([[1, 0, 600], [0, 1, 0]])
    stretched = Transform([[1.01, 0, 600, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    assert procedure._misfit((mask, mask), apart, stretched) == pytest.approx(0.8, abs=0.1)


def test_patch_motions_give_a_quadratic_from_the_moving_points():
    """_fit_patch_motions with source_from_patch: the quadratic from each patch's moving points
    to where its motion takes them, whose residuals are ~0 when the motions are those of a
    quadratic (its affine part misses by tens of pixels), and how far it moves each centre;
    three None with too few patches for a quadratic."""
    quadratic = Transform(
        [[1.01, 0.02, 1.5, 2e-4, -1e-4, 1e-4], [-0.02, 0.99, -2.0, -1e-4, 2e-4, 1.5e-4]]
    )
    corners, local, _ = consistent_patches(0, 20)
    centres = np.asarray(corners, np.float64) + 32
    local[:, :2, 2] = quadratic(centres) - centres
    source = np.array([translation(x, y) for x, y in corners])  # the moving points: the view's
    fit, residual, moved = procedure._fit_patch_motions(local, corners, 64, "trimmed", None, source)
    assert fit.model == "quadratic"
    grid = np.stack(np.meshgrid(np.linspace(0, 384, 9), np.linspace(0, 384, 9)), -1)
    grid = grid.reshape(-1, 2)
    assert np.abs(fit(grid) - quadratic(grid)).max() < 1e-3  # float32 points
    assert np.abs(Transform(quadratic.matrix[:, :3])(grid) - quadratic(grid)).max() > 10
    assert residual.max() < 1e-3
    np.testing.assert_allclose(moved, np.linalg.norm(local[:, :2, 2], axis=1), atol=1e-3)
    _, affine_residual, _ = procedure._fit_patch_motions(local, corners, 64, "trimmed")
    assert affine_residual.max() > 3  # an affine cannot fit the same motions
    few = procedure._fit_patch_motions(local[:5], corners[:5], 64, "trimmed", None, source[:5])
    assert few == (None, None, None)


def test_patches_lie_in_both_fields_of_view_under_a_quadratic():
    """_patch_corners with a quadratic estimate: every patch's corners and centre, carried back
    by the quadratic's inverse, lie in the moving field of view; the corners found with its
    affine part alone would put some outside it."""
    bend = -5e-4  # x and y each pulled in by up to 73 px at the far edges of the 384 px image
    t = Transform([[1, 0, 60, bend, 0, 0], [0, 1, -30, 0, 0, bend]])
    corners = procedure._patch_corners(DISC_MASKS, t, np.eye(3), PATCH_VIEW, PATCH, 100)
    assert len(corners) >= 20
    assert not outside_both_fields_of_view(corners, t)
    affine_part = Transform(t.matrix[:, :3])
    only_affine = procedure._patch_corners(
        DISC_MASKS, affine_part, np.eye(3), PATCH_VIEW, PATCH, 100
    )
    assert outside_both_fields_of_view(only_affine, t)


def outside_both_fields_of_view(corners, t):
    """The corners of patches with a probe (corners and centre) outside the fixed field of view
    or, carried back by ``t.inverse``, outside the moving one (DISC_MASKS)."""
    probes = np.array([[0, 0], [PATCH - 1, 0], [0, PATCH - 1], [PATCH - 1] * 2, [PATCH / 2] * 2])
    outside = []
    for corner in corners:
        fixed = probes + corner
        for points in (fixed, t.inverse(fixed)):
            x, y = np.rint(points * 0.5).astype(int).T
            inside = (x >= 0) & (x < 192) & (y >= 0) & (y < 192)
            if not inside.all() or not DISC[y, x].all():
                outside.append(tuple(corner))
                break
    return outside


def test_a_dropped_finer_pass_keeps_the_misfit_that_the_kept_pass_measured(model, bent_pair):
    """Where a finer pass is dropped (its patches agree with neither model: blur) and fits no
    quadratic, the confidence stays capped by the quadratic of the pass kept before it: the
    misfit measured there is not lost."""
    fixed, moving, _ = bent_pair
    confidences = []
    for drop in (False, True):
        registrar = procedure.NetRegistrar(model, misfit_px=2.0)
        real = registrar._fine_pass

        def fine_pass(pyramids, masks, t, size, real=real, drop=drop):
            out = real(pyramids, masks, t, size)
            return (out[0], 0.2, out[2], None) if drop and size == 768 else out

        registrar._fine_pass = fine_pass
        confidences.append(registrar.register(fixed, moving).confidence)
    assert confidences[0] < 0.5 and confidences[1] < 0.5, confidences
