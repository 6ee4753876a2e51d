"""Classical registration baselines (OpenCV): SIFT and ORB with RANSAC, and pyramid ECC.

Every method returns a ``Registration`` whose ``fixed_from_moving`` maps moving-file pixels to
fixed-file pixels (common.py's convention): an affine, or with ``transform="quadratic"`` (SIFT,
ORB) the quadratic through RANSAC's inliers; ECC aligns an affine only, and says so. Each works on
a reduced copy of each image (the "work" frame: longest side SIFT_SIDE, ORB_SIDE or ECC_SIDE) and
converts back with ``Transform.compose(inv(work_from_fixed_file), work_from_moving_file)``.
Failures (too few features or inliers, a degenerate matrix, ECC not converging) are returned as
``Registration(None, 0.0, reason)``; nothing here raises because of image content.
"""

import cv2
import numpy as np

from common import MODELS, Registration, fit_transform, fov_mask, scale_matrix, to3x3

# Preprocessing
CLAHE_CLIP = 3.0  # CLAHE clip limit, on tiles of about CLAHE_TILE_PX work pixels
CLAHE_TILE_PX = 80
RIM_ERODE = 0.03  # features: shrink the field of view by this share of the side (aperture rim)

# Features + RANSAC
SIFT_SIDE = 512  # working size (longest side, px) of SIFT
SIFT_FEATURES = 2000
SIFT_CONTRAST = 0.03  # SIFT contrastThreshold (OpenCV default 0.04 finds too few on vessels)
ORB_SIDE = 384  # ORB: smaller and fewer than SIFT, same accuracy on fire-dev, 10x faster
ORB_FEATURES = 1000
ORB_LEVELS = 4  # pyramid levels (scale factor 1.2): fundus pairs differ little in scale
RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 5.0  # inlier threshold in work pixels (loose: the retina is not exactly affine)
RANSAC_ITERS = 5000
REFINE_ITERS = 10  # Levenberg-Marquardt refit on the inliers
MIN_INLIERS = 8
QUADRATIC_INLIERS = 12  # transform quadratic: fewer inliers leave the affine

# ECC
ECC_SIDE = 384  # finest ECC level (longest side, px); the pyramid halves it down to ECC_COARSE_SIDE
ECC_COARSE_SIDE = 64  # levels this small align intensities with a rigid motion (capture range)
ECC_ITERS = 100
ECC_EPS = 1e-5
ECC_BLUR = 5  # gaussFiltSize of findTransformECC
ECC_MIN_RHO = 0.2  # correlation below this at the finest level counts as a failure

# A plausible fundus affine: scale within [1/MAX_SCALE, MAX_SCALE], anisotropy below MAX_SKEW
MAX_SCALE = 3.0
MAX_SKEW = 2.0


def _prepare(image, side, erode=0.0):
    """(CLAHE'd work pixels, field-of-view mask, work_from_file 3x3) for a longest side ``side``."""
    h, w = image.pixels.shape
    s = min(1.0, side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    pixels = cv2.resize(image.pixels, size, interpolation=cv2.INTER_AREA) if s < 1 else image.pixels
    mask = fov_mask(pixels)
    if cv2.countNonZero(mask) < 0.1 * mask.size:  # no aperture found (very dark): use everything
        mask[:] = 255
    if erode > 0:
        r = max(1, round(erode * max(size)))
        mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    tiles = max(1, round(max(size) / CLAHE_TILE_PX))
    pixels = cv2.createCLAHE(CLAHE_CLIP, (tiles, tiles)).apply(pixels)
    work_from_decoded = scale_matrix(size[0] / w, size[1] / h)
    return pixels, mask, work_from_decoded @ image.decoded_from_file


def _to_file(a_work, work_from_fixed, work_from_moving):
    """fixed_from_moving in file pixels from the work-frame matrix, or None if it is implausible."""
    if a_work is None or not np.all(np.isfinite(a_work)):
        return None
    a = (np.linalg.inv(work_from_fixed) @ to3x3(a_work) @ work_from_moving)[:2]
    singular = np.linalg.svd(to3x3(a_work)[:2, :2], compute_uv=False)
    if singular[1] <= 1 / MAX_SCALE or singular[0] >= MAX_SCALE:
        return None
    if singular[0] / singular[1] > MAX_SKEW or np.linalg.det(a_work[:2, :2]) <= 0:
        return None
    return a


def _register_features(fixed, moving, detector, norm, side, transform="affine"):
    """Detect + describe in both work images, ratio-test the matches, RANSAC an affine; with
    ``transform`` quadratic, then the quadratic through its inliers (_quadratic)."""
    found = []
    for image in (fixed, moving):
        pixels, mask, work_from_file = _prepare(image, side, RIM_ERODE)
        keypoints, descriptors = detector.detectAndCompute(pixels, mask)
        if descriptors is None or len(keypoints) < MIN_INLIERS:
            return Registration(None, 0.0, f"too few keypoints ({len(keypoints)})")
        found.append((keypoints, descriptors, work_from_file))
    (kp_f, des_f, wf), (kp_m, des_m, wm) = found
    pairs = cv2.BFMatcher(norm).knnMatch(des_m, des_f, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_INLIERS:
        return Registration(None, 0.0, f"too few matches after the ratio test ({len(good)})")
    src = np.float32([kp_m[m.queryIdx].pt for m in good])
    dst = np.float32([kp_f[m.trainIdx].pt for m in good])
    a_work, inliers = cv2.estimateAffine2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=RANSAC_PX,
        maxIters=RANSAC_ITERS,
        confidence=0.999,
        refineIters=REFINE_ITERS,
    )
    count = 0 if inliers is None else int(inliers.sum())
    if a_work is None or count < MIN_INLIERS:
        return Registration(None, 0.0, f"too few RANSAC inliers ({count} of {len(good)} matches)")
    a = _to_file(a_work, wf, wm)
    if a is None:
        return Registration(None, 0.0, "RANSAC gave an implausible (degenerate) affine")
    if transform not in MODELS:
        raise ValueError(f"transform must be {' or '.join(MODELS)}, not {transform!r}")
    if transform == "quadratic":
        q = _quadratic(src, dst, inliers.ravel() > 0)
        if q is not None:  # its confidence from its own inliers
            a, count = q[0].compose(np.linalg.inv(wf), wm), int(q[1].sum())
    confidence = (count / len(good)) * min(1.0, count / (4 * MIN_INLIERS))
    return Registration(a, float(confidence), None)


def _quadratic(src, dst, inliers):
    """The quadratic (work pixels) through RANSAC's inliers, then once more through the matches
    it leaves within RANSAC_PX (where the retina bends away from the affine, RANSAC's affine
    leaves good matches out). Returns (the fit, the matches within RANSAC_PX of it), or None
    (the affine stands) with fewer than QUADRATIC_INLIERS."""
    for _ in range(2):
        if inliers.sum() < QUADRATIC_INLIERS:
            return None
        try:
            fit, _ = fit_transform(src[inliers], dst[inliers], "quadratic")
        except ValueError:  # the inliers lie on one conic
            return None
        inliers = np.linalg.norm(fit(src) - dst, axis=1) <= RANSAC_PX
    return fit, inliers


def register_sift(fixed, moving, side=SIFT_SIDE, features=SIFT_FEATURES, transform="affine"):
    """SIFT keypoints + Lowe ratio test + RANSAC affine (then, with ``transform`` quadratic, the
    quadratic through its inliers), at a longest side of ``side`` px."""
    sift = cv2.SIFT_create(features, contrastThreshold=SIFT_CONTRAST)
    return _register_features(fixed, moving, sift, cv2.NORM_L2, side, transform)


def register_orb(
    fixed, moving, side=ORB_SIDE, features=ORB_FEATURES, levels=ORB_LEVELS, transform="affine"
):
    """ORB keypoints + ratio test on Hamming distances + RANSAC affine (then, with ``transform``
    quadratic, the quadratic through its inliers), at a longest side of ``side`` px."""
    orb = cv2.ORB_create(features, nlevels=levels)
    return _register_features(fixed, moving, orb, cv2.NORM_HAMMING, side, transform)


def _ecc_levels(fixed, moving, side):
    """Pyramid levels, coarse first: fixed (image, mask, work_from_file), the same for moving, and
    the motion type.

    Levels of at most ECC_COARSE_SIDE px use CLAHE'd intensities (optic disc, macula, vignetting)
    and a rigid motion: that is what gives ECC its capture range from the identity. Finer levels
    use the gradient magnitude (vessel edges; robust to exposure and colour changes) and an affine.
    """
    sides = [min(side, max(fixed.pixels.shape + moving.pixels.shape))]
    while sides[-1] > ECC_COARSE_SIDE:
        sides.append(sides[-1] / 2)
    levels = []
    for side in reversed(sides):
        coarse = side <= ECC_COARSE_SIDE
        level = []
        for image in (fixed, moving):
            pixels, mask, work_from_file = _prepare(image, side)
            if not coarse:
                pixels, mask = edges(pixels, mask)
            level += [pixels, mask, work_from_file]
        levels.append((*level, cv2.MOTION_EUCLIDEAN if coarse else cv2.MOTION_AFFINE))
    return levels


def edges(pixels, mask):
    """Gradient magnitude (vessel edges; robust to exposure and colour changes) and the mask
    eroded so that the aperture rim's own gradient is left out."""
    magnitude = cv2.magnitude(
        cv2.Sobel(pixels, cv2.CV_32F, 1, 0), cv2.Sobel(pixels, cv2.CV_32F, 0, 1)
    )
    return magnitude, cv2.erode(mask, np.ones((5, 5), np.uint8))


def register_ecc(fixed, moving, side=ECC_SIDE, transform="affine"):
    """Coarse-to-fine ECC from the identity, with field-of-view masks on both images, up to a
    longest side of ``side`` px. An affine whatever ``transform`` asks: OpenCV's ECC aligns
    intensities under an affine or a homography only (the result says which model it holds)."""
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, ECC_ITERS, ECC_EPS)
    warp, frames, rho = np.eye(3), None, 0.0  # warp: moving_from_fixed in the current level
    for f_img, f_mask, wf, m_img, m_mask, wm, motion in _ecc_levels(fixed, moving, side):
        if frames is not None:  # carry the warp over from the previous (coarser) level's frames
            warp = wm @ np.linalg.inv(frames[1]) @ warp @ frames[0] @ np.linalg.inv(wf)
        frames = (wf, wm)
        try:
            rho, w = cv2.findTransformECCWithMask(
                f_img,
                m_img,
                f_mask,
                m_mask,
                warp[:2].astype(np.float32),
                motion,
                criteria,
                ECC_BLUR,
            )
        except cv2.error as e:
            reason = (getattr(e, "err", "") or str(e)).strip().splitlines()[-1][:100]
            side = max(f_img.shape)
            return Registration(None, 0.0, f"ECC failed at {side} px: {reason}")
        warp = to3x3(w)
        if not np.all(np.isfinite(warp)) or abs(np.linalg.det(warp)) < 1e-6:
            return Registration(None, 0.0, f"ECC gave a degenerate matrix at {max(f_img.shape)} px")
    if rho < ECC_MIN_RHO:
        return Registration(None, 0.0, f"ECC correlation too low ({rho:.2f})")
    a = _to_file(np.linalg.inv(warp)[:2], *frames)
    if a is None:
        return Registration(None, 0.0, "ECC gave an implausible (degenerate) affine")
    return Registration(a, float(np.clip(rho, 0.0, 1.0)), None)


METHODS = {"sift": register_sift, "orb": register_orb, "ecc": register_ecc}
