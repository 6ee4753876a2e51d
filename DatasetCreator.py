"""DatasetCreator.py - step 1 of 4: image pairs -> patch pairs and their target matrices, in shards.

Sources (either or both; folders comma separated): --fire DIRS, FIRE-layout folders of REAL pairs
(each pair's affine fitted to its control points; each sampled REAL_REPEATS times), and --photos
DIRS, single photographs (and skimage.data.retina()) moved by a known random affine plus a small
smooth distortion beneath a camera aperture that stays put, with photometric change on each view
and lesions or a rim flare on some (``synthetic_pair``). From each pair, SAMPLES_PER_PAIR patch
pairs of PATCH_SIZE px, the way registrar.NetRegistrar sees them: both whole images as squares,
the moving one as it is or pre-warped by a random estimate. Each target is
``fixedpatch_from_movingpatch`` in normalised patch coordinates (Network.py). Output (OUT): shards
``<split>-NNNN-x.npy`` / ``-y.npy`` and ``manifest.json``, split by source, each shard written
under a temporary name and listed only once complete (a rerun skips finished shards).

--write-sample DIR writes synthetic pairs as a FIRE-layout folder instead (data/sample:
``--write-sample data/sample --synth-size 768``); --write-moved DIR writes the --fire folders'
S pairs moved apart under one aperture (real appearance change, P motion), for testing.
"""

import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from common import (
    InputError,
    cli,
    exit_on_input_error,
    fit_affine,
    fov_mask,
    local_from_global,
    norm_from_pixels,
    read_fire,
    read_image,
    rotation,
    square_view,
    to3x3,
    translation,
    write_atomic,
    write_json,
)

FIRE = ""  # FIRE-layout folders of real pairs, comma separated ("" = none)
PHOTOS = ""  # folders of single photographs for synthetic motion, comma separated ("" = none)
RETINA = True  # also use skimage.data.retina() as a photograph
OUT = "data/patches"
PATCH_SIZE = 64  # = the network's INPUT_SIZE
SYNTH_SIZE = 384  # side of synthetic pairs (px)
PAIRS_PER_PHOTO = 100
REAL_REPEATS = 10  # each real (FIRE) pair is sampled this often, each time with new pre-warps
SAMPLES_PER_PAIR = 6
PAIRS_PER_SHARD = 240
VAL_FRACTION = 0.15  # share of photographs / FIRE pairs held out for validation
SEED = 0
MAX_TRANSLATION = 0.5  # FIRE pairs moving more than this fraction of the side are skipped
COARSE_SHARE = 1.0  # share of whole-image (coarse) samples; the rest are fine patches
LARGE_SHARE = 0.5  # share of later coarse samples pre-warped by a full-range wrong estimate
FINE_SIZE_MIN = 256
FINE_SIZE_MAX = 512
WRITE_SAMPLE = ""  # if set: write SAMPLE_PAIRS synthetic FIRE-layout pairs here, no shards
SAMPLE_PAIRS = 6
WRITE_MOVED = ""  # if set: write the --fire folders' S pairs here, moved apart (P pairs), no shards
MOVES_PER_PAIR = 2
REJECT_BLACK_PIXELS = 10  # a fine patch with more black (out-of-FOV) pixels is rejected
# Synthetic motion (fixed_from_moving about the image centre) and residuals (in patch units)
MAX_ROTATION_DEG = 25.0
MAX_SCALE = 0.15  # scale in [1 - MAX_SCALE, 1 + MAX_SCALE]
MAX_SHEAR = 0.03
MAX_SHIFT = 0.45  # translation of the centre, fraction of the side (FIRE's P pairs: 35-45 %)
DISTORTION_PX = 1.5  # amplitude of the smooth non-affine distortion at SYNTH_SIZE
RESIDUAL_SHIFT = 0.06  # fraction of the patch side
RESIDUAL_ROTATION_DEG = 3.0
RESIDUAL_SCALE = 0.03
# The camera (synthetic pairs): aperture shapes, and what changes between the two visits
FULL_FRAME_SHARE = 0.2  # no round aperture (scanning-laser images)
CLIPPED_SHARE = 0.3  # of the round apertures, clipped at top and bottom (wide sensors)
LESION_SHARE = 0.3  # the moving view shows lesions the fixed one does not
FLARE_SHARE = 0.2  # the moving view has a flare at the aperture's rim


# ----------------------------------------------------------------------------------------------
# Sources of pairs


def random_affine(rng, centre, rotation_deg, scale, shear, shift):
    """Random ``fixed_from_moving`` (3x3): rotation, scale, shear and shift about ``centre``."""
    angle = np.radians(rng.uniform(-rotation_deg, rotation_deg))
    s = np.exp(rng.uniform(np.log(1 - scale), np.log(1 + scale)))
    aniso = 1 + rng.uniform(-shear, shear)
    c, si = np.cos(angle), np.sin(angle)
    linear = np.array([[c, -si], [si, c]]) @ np.array(
        [[s * aniso, rng.uniform(-shear, shear)], [0, s / aniso]]
    )
    radius = shift * rng.uniform(0, 1) ** 0.5
    direction = rng.uniform(0, 2 * np.pi)
    m = np.eye(3)
    m[:2, :2] = linear
    return (
        translation(*(np.array(centre) + radius * np.array([np.cos(direction), np.sin(direction)])))
        @ m
        @ translation(-centre[0], -centre[1])
    )


def photometric(rng, bgr, strength=1.0):
    """Exposure, colour, illumination gradient, haze, defocus, noise and JPEG, as follow-up visits
    differ; ``strength`` scales the ranges of exposure, illumination, haze and blur."""
    img = bgr.astype(np.float32) / 255.0
    gamma = np.exp(rng.uniform(-1, 1) * 0.5 * strength)
    img = img**gamma * rng.uniform(1 - 0.4 * strength, 1 + 0.4 * strength, size=3)  # colour gains
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w) - 0.5
    gx, gy = rng.uniform(-0.8, 0.8, 2) * strength
    img *= np.clip(1 + gx * xx + gy * yy, 0.3, 2)[..., None]  # uneven illumination
    if rng.uniform() < 0.4 * strength:  # haze: a smooth veil over part of the retina
        veil = cv2.resize(rng.uniform(0, 1, (3, 3)).astype(np.float32), (w, h))
        amount = rng.uniform(0.1, 0.5) * veil[..., None]
        img = img * (1 - amount) + amount * rng.uniform(0.4, 0.9) * img.mean()
    img = np.clip(img * 255, 0, 255)
    sigma = rng.uniform(0, 1.5 + 1.5 * strength)
    if sigma > 0.3:  # defocus
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = np.clip(img + rng.normal(0, rng.uniform(0, 6), img.shape), 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.uniform(40, 95))])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)


def lesions(rng, bgr):
    """A few bright (exudate-like) or dark (haemorrhage-like) spots: change between two visits."""
    out = bgr.copy()
    size = bgr.shape[0]
    for _ in range(int(rng.integers(2, 12))):
        centre = tuple(int(v) for v in rng.uniform(0.2, 0.8, 2) * size)
        axes = tuple(int(v) for v in rng.uniform(0.005, 0.03, 2) * size + 1)
        colour = (40, 200, 230) if rng.uniform() < 0.5 else (20, 20, 90)
        cv2.ellipse(out, centre, axes, rng.uniform(0, 180), 0, 360, colour, -1)
    return cv2.GaussianBlur(out, (0, 0), 1.0)


def flare(rng, bgr, aperture):
    """A bright crescent at the rim of the camera's aperture (stray light): it belongs to the
    camera, so it stays put while the retina moves."""
    size = bgr.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    spot = np.zeros((size, size), np.float32)
    c = size / 2 + 0.5 * size * np.array([np.cos(angle), np.sin(angle)])
    cv2.circle(spot, (int(c[0]), int(c[1])), int(size * rng.uniform(0.1, 0.3)), 1.0, -1)
    spot = cv2.GaussianBlur(spot, (0, 0), size * 0.04) * rng.uniform(0.3, 1.0)
    spot *= aperture[..., 0] > 0
    tint = np.array([rng.uniform(0.3, 0.8), rng.uniform(0.7, 1.0), 1.0], np.float32) * 255
    return np.clip(bgr + spot[..., None] * tint, 0, 255).astype(np.uint8)


def camera_aperture(rng, size, args):
    """The camera's field of view in the image frame, the SAME for fixed and moving (the camera
    stays put, the retina moves beneath it): (uint8 mask, distance from the centre to its
    farthest point). A disc (FIRE, DRIVE), a disc clipped at top and bottom (wide sensors), or
    the whole frame (scanning-laser images have no round aperture)."""
    mask = np.zeros((size, size), np.uint8)
    if rng.uniform() < args.FULL_FRAME_SHARE:
        mask[:] = 255
        return mask, size / np.sqrt(2)
    radius = size * rng.uniform(0.42, 0.5)
    cv2.circle(mask, (size // 2, size // 2), int(radius), 255, -1)
    if rng.uniform() < args.CLIPPED_SHARE:
        band = int(size * rng.uniform(0.03, 0.17))
        mask[:band], mask[size - band :] = 0, 0
    return mask, radius


def source_disc(bgr):
    """((x, y) centre, radius) of the largest disc inside a photograph's own field of view: where
    a synthetic view may sample its retina (never the photograph's own border, which would move
    with the retina and give the motion away), and inside the frame: a field of view cut by
    the frame's edges (IDRiD's, at top and bottom; some of STARE's, at the sides) or filling it
    (a scanning-laser image, no aperture) ends at them. OpenCV's distance transform counts only
    the zero pixels it is given, not the frame's edges (a full frame would give FLT_MAX): the
    mask gets a one-pixel border of zeros first."""
    inside = (fov_mask(bgr[:, :, 1]) > 0).astype(np.uint8)
    inside = cv2.copyMakeBorder(inside, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    distance = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    _, radius, _, centre = cv2.minMaxLoc(distance)
    # the centre back in the photograph's frame; the radius to the last pixel inside, not the
    # first outside (a frame-filling image's disc then ends at its edge pixels)
    return np.array(centre, np.float64) - 1, float(radius) - 1


def synthetic_pair(rng, photo, args, motion=1.0, appearance=1.0):
    """(fixed, moving, fixed_from_moving 3x3, maps) from one photograph ``(name, bgr, disc)``:
    colour images of SYNTH_SIZE px; ``maps[y, x]`` is the fixed-image point of moving pixel
    (x, y) (the affine plus the distortion). ``motion`` scales the ranges of rotation, scale,
    shear and shift; ``appearance`` the moving view's photometric change.

    As in a real follow-up, the camera's aperture stays put and the retina moves beneath it:
    both views sample the photograph's retina inside its own field of view (``source_disc``),
    zoomed so that the fixed view and the moved one both fit there, and the same aperture is
    laid over both. Each view has its own photometric change; the moving one may also carry
    lesions and a flare at the aperture's rim."""
    _, bgr, (disc_centre, disc_radius) = photo
    size = args.SYNTH_SIZE
    centre = np.array([(size - 1) / 2, (size - 1) / 2])
    ranges = np.array(
        [args.MAX_ROTATION_DEG, args.MAX_SCALE, args.MAX_SHEAR, args.MAX_SHIFT * size]
    )
    a = random_affine(rng, centre, *(motion * ranges))
    aperture, reach = camera_aperture(rng, size, args)
    # source_from_fixed: fixed pixels -> photograph pixels; the midpoint of the fixed view's
    # centre and the moved one's goes to the disc's centre, at a zoom where both views fit
    moved_centre = a[:2, :2] @ centre + a[:2, 2]
    stretch = max(1.0, np.linalg.svd(a[:2, :2], compute_uv=False)[0])
    fit = 0.97 * disc_radius / (stretch * reach + np.linalg.norm(moved_centre - centre) / 2)
    zoom = fit * rng.uniform(0.75, 1.0)  # photograph pixels per view pixel
    source_from_fixed = (
        translation(*disc_centre)
        @ rotation(rng.uniform(-20, 20))
        @ np.diag([zoom, zoom, 1.0])
        @ translation(*(-(centre + moved_centre) / 2))
    )
    if zoom > 1.2:  # shrinking: blur first, against aliasing
        bgr = cv2.GaussianBlur(bgr, (0, 0), 0.45 * zoom)
    # moving(p) = retina(A p + d(p)): the same retina after the motion, slightly distorted
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).astype(np.float32)
    maps = grid @ a[:2, :2].T.astype(np.float32) + a[:2, 2].astype(np.float32)
    field = cv2.resize(
        rng.normal(0, 1, (4, 4, 2)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    maps += args.DISTORTION_PX * field / 2
    src = maps @ source_from_fixed[:2, :2].T.astype(np.float32)
    src += source_from_fixed[:2, 2].astype(np.float32)
    moving = cv2.remap(bgr, src[..., 0], src[..., 1], cv2.INTER_LINEAR)
    fixed = cv2.warpAffine(
        bgr, source_from_fixed[:2], (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    )
    fixed = photometric(rng, fixed, 0.5)
    if rng.uniform() < args.LESION_SHARE:
        moving = lesions(rng, moving)
    moving = photometric(rng, moving, appearance)
    aperture = aperture[..., None]
    if rng.uniform() < args.FLARE_SHARE:
        moving = flare(rng, moving, aperture)
    return fixed & aperture, moving & aperture, a, maps


def load_photos(args):
    """[(name, colour image, source_disc)] of the photographs in the PHOTOS folders (and
    skimage.data.retina()); unreadable ones are reported, not fatal."""
    photos, failed = [], []
    if args.RETINA:
        from skimage.data import retina

        photos.append(("skimage-retina", cv2.cvtColor(retina(), cv2.COLOR_RGB2BGR)))
    for folder in folders(args.PHOTOS):
        if not folder.is_dir():
            raise InputError(folder, "photo folder not found")
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            try:
                # the same checks as everywhere: empty, truncated, tiny, black...
                height, width = read_image(path).file_shape
                factor = 1  # decode large photos reduced (bounded memory), still >= SYNTH_SIZE
                while max(height, width) / (factor * 2) >= args.SYNTH_SIZE and factor < 8:
                    factor *= 2
                flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}
                flags.update({4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8})
                img = cv2.imread(str(path), flags[factor])
                if img is None:
                    raise InputError(path, "cannot decode the image")
                photos.append((path.name, img))
            except InputError as e:
                failed.append({"source": str(path), "reason": e.problem})
    return [(name, img, source_disc(img)) for name, img in photos], failed


def folders(text):
    """Paths of a comma-separated list of folders ("" = none)."""
    return [Path(part.strip()) for part in str(text).split(",") if part.strip()]


def load_fire(args):
    """[(name, fixed grey, moving grey, fixed_from_moving 3x3)] of usable FIRE pairs."""
    pairs, failed = [], []
    items = [(root, item) for root in folders(args.FIRE) for item in read_fire(root)]
    for root, item in items:
        try:
            if item.problem:
                raise InputError(item.pair, item.problem)
            fixed, moving = read_image(item.fixed), read_image(item.moving)
            try:
                a, residual = fit_affine(item.points[:, 2:4], item.points[:, 0:2])
            except ValueError as e:  # e.g. collinear points: name the file
                gt = root / "Ground Truth" / f"control_points_{item.pair}_1_2.txt"
                raise InputError(gt, str(e)) from None
            shift = np.hypot(*a[:, 2]) / max(fixed.file_shape)
            print(
                f"{item.pair}: affine residual {residual.mean():.2f} px "
                f"(max {residual.max():.2f}), "
                f"translation {shift:.1%} of the side"
            )
            if shift > args.MAX_TRANSLATION:
                raise InputError(
                    item.pair, f"translation {shift:.1%} of the side exceeds MAX_TRANSLATION"
                )
            a = fixed.decoded_from_file @ to3x3(a) @ np.linalg.inv(moving.decoded_from_file)
            pairs.append((f"{root.name}/{item.pair}", fixed.pixels, moving.pixels, a))
        except InputError as e:
            failed.append({"source": f"{root.name}/{item.pair}", "reason": str(e)})
    return pairs, failed


def write_fire_pair(root, pair, fixed, moving, points, quality):
    """One pair in the FIRE layout: Images/<pair>_1.jpg (fixed), Images/<pair>_2.jpg (moving),
    Ground Truth/control_points_<pair>_1_2.txt (rows x_fixed y_fixed x_moving y_moving)."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Ground Truth").mkdir(parents=True, exist_ok=True)
    for index, image in ((1, fixed), (2, moving)):
        _, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        write_atomic(root / "Images" / f"{pair}_{index}.jpg", data.tobytes())
    lines = "".join(f"{fx:.2f} {fy:.2f} {x:.2f} {y:.2f}\n" for fx, fy, x, y in points)
    write_atomic(root / "Ground Truth" / f"control_points_{pair}_1_2.txt", lines)


def write_fire_folder(photos, args):
    """Write SAMPLE_PAIRS synthetic pairs as a FIRE-layout folder (categories S, P, A in turn:
    small motion, large motion, small motion with strongest appearance change) with 10 control
    points each, taken through the true motion including its distortion."""
    root = Path(args.WRITE_SAMPLE)
    for k in range(args.SAMPLE_PAIRS):
        category = "SPA"[k % 3]
        rng = np.random.default_rng([args.SEED, 10_000 + k])
        fixed, moving, _, maps = synthetic_pair(
            rng,
            photos[k % len(photos)],
            args,
            motion=1.0 if category == "P" else 0.35,
            appearance=1.6 if category == "A" else 1.0,
        )
        size = fixed.shape[0]
        # control points: moving pixels inside both apertures, mapped to the fixed image
        points = []
        while len(points) < 10:
            x, y = rng.integers(size // 6, size - size // 6, 2)
            fx, fy = maps[y, x]
            if fixed[int(fy) % size, int(fx) % size, 1] > 10 and moving[y, x, 1] > 10:
                points.append((fx, fy, x, y))
        write_fire_pair(root, f"{category}{k // 3 + 1:02d}", fixed, moving, points, quality=90)
    used = sorted({photos[k % len(photos)][0] for k in range(args.SAMPLE_PAIRS)})
    print(f"{root}: {args.SAMPLE_PAIRS} FIRE-layout pairs from {', '.join(used)}")


_MOVED_APERTURE = 0.47  # radius of moved_pair's aperture, a share of the crop's side


def moved_pair(rng, fixed, moving, points, args):
    """A harder real pair from a real one (colour images and their control points): crops of
    side C of both captures, the same round aperture laid over each (the camera stays put), the
    moving crop moved by a shift of MAX_SHIFT/2..MAX_SHIFT of C, a rotation up to
    MAX_ROTATION_DEG and a scale up to MAX_SCALE/2 (the FIRE P pairs' range). Both crops lie
    inside their capture's own field of view (``source_disc``), so no border shows. Returns
    (fixed crop, moving crop, points in crop pixels: x_fixed y_fixed x_moving y_moving). All
    the pair's points are kept (in FIRE they all lie in the overlap; here some may lie outside a
    crop, where they still measure the affine, extrapolated, against the real motion: most do,
    ``inside_both_apertures``)."""
    (fixed_centre, fixed_radius), (moving_centre, moving_radius) = map(source_disc, (fixed, moving))
    shift = rng.uniform(args.MAX_SHIFT / 2, args.MAX_SHIFT)
    degrees = rng.uniform(-args.MAX_ROTATION_DEG, args.MAX_ROTATION_DEG)
    scale = np.exp(rng.uniform(-args.MAX_SCALE / 2, args.MAX_SCALE / 2))
    # the aperture (radius _MOVED_APERTURE C, scaled) of each crop lies inside the smaller disc
    side = int(
        0.98
        * min(fixed_radius, moving_radius)
        / (_MOVED_APERTURE * (1 + args.MAX_SCALE / 2) + shift / 2)
    )
    direction = rng.uniform(0, 2 * np.pi)
    offset = shift * side / 2 * np.array([np.cos(direction), np.sin(direction)])
    centre = translation(side / 2, side / 2)
    crop_from_fixed = centre @ translation(*(offset - fixed_centre))
    crop_from_moving = (
        centre
        @ rotation(degrees)
        @ np.diag([scale, scale, 1.0])
        @ translation(*(-offset - moving_centre))
    )
    aperture = np.zeros((side, side), np.uint8)
    centre_px, radius_px = aperture_circle(side)
    cv2.circle(aperture, (centre_px, centre_px), radius_px, 255, -1)
    crops = [
        cv2.warpAffine(image, m[:2], (side, side), flags=cv2.INTER_AREA) & aperture[..., None]
        for image, m in ((fixed, crop_from_fixed), (moving, crop_from_moving))
    ]
    moved = np.hstack(
        [
            points[:, 0:2] @ crop_from_fixed[:2, :2].T + crop_from_fixed[:2, 2],
            points[:, 2:4] @ crop_from_moving[:2, :2].T + crop_from_moving[:2, 2],
        ]
    )
    return crops[0], crops[1], moved


def aperture_circle(side):
    """(centre, radius) in pixels of the round aperture that ``moved_pair`` lays over a crop of
    side ``side`` (the centre is (centre, centre))."""
    return side // 2, int(_MOVED_APERTURE * side)


def inside_both_apertures(points, side):
    """(K,) bool: which of a moved pair's points (``moved_pair``'s, in crop pixels) lie inside the
    aperture of both crops, the overlap where FIRE puts all of a pair's control points."""
    centre, radius = aperture_circle(side)
    return np.all([np.hypot(*(points[:, k : k + 2] - centre).T) <= radius for k in (0, 2)], axis=0)


def write_moved_folder(args):
    """Write MOVES_PER_PAIR moved versions (``moved_pair``) of every S pair of the FIRE folders
    as a FIRE-layout folder of P pairs."""
    root = Path(args.WRITE_MOVED)
    count, inside = 0, []
    for folder in folders(args.FIRE):
        for item in read_fire(folder):
            if item.category != "S":
                continue
            try:  # a pair that cannot be used is reported, and the others are written
                if item.problem:
                    raise InputError(item.pair, item.problem)
                images = []
                for path in (item.fixed, item.moving):
                    read_image(path)  # the checks of everywhere else: empty, truncated, black...
                    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # file pixels
                    image = cv2.imread(str(path), flags)
                    if image is None:
                        raise InputError(path, "cannot be decoded as an image")
                    images.append(image)
                for _ in range(args.MOVES_PER_PAIR):
                    rng = np.random.default_rng([args.SEED, count])
                    fixed, moving, points = moved_pair(rng, *images, item.points, args)
                    if fixed.shape[0] < 64:
                        raise InputError(item.fixed, "field of view too small to cut a moved pair")
                    count += 1
                    write_fire_pair(root, f"P{count:02d}", fixed, moving, points, quality=95)
                    inside.append(np.count_nonzero(inside_both_apertures(points, len(fixed))))
            except InputError as e:
                print(f"warning: skipped {folder}/{item.pair}: {e}")
    if not count:
        raise InputError(args.FIRE or "--fire", "no S pairs to move")
    print(f"{root}: {count} moved FIRE-layout pairs from {args.FIRE}")
    few = sum(n < 3 for n in inside)
    print(  # the pairs' errors measure the affine mostly outside the overlap (moved_pair)
        f"control points inside both apertures: median {np.median(inside):g} per pair, "
        f"{few} of {count} pairs with fewer than 3"
    )


# ----------------------------------------------------------------------------------------------
# Patch sampling


def sample_patches(rng, fixed, moving, fixed_from_moving, args):
    """SAMPLES_PER_PAIR (x (P, P, 2) uint8, y (2, 3) float32) from one pair.

    Sample 0 is the coarse first look (whole views, moving as it is); the others are coarse views
    whose moving view is pre-warped by an estimate that is either far from the truth (full-range
    error, LARGE_SHARE of coarse samples) or near it, or fine patches pre-warped near the truth."""
    p = args.PATCH_SIZE
    norm = norm_from_pixels(p)
    views = {}  # size -> (fixed view, moving view, truth, fixed FOV mask)
    xs, ys = [], []
    for attempt in range(100 * args.SAMPLES_PER_PAIR):
        if len(xs) == args.SAMPLES_PER_PAIR:
            break
        coarse = attempt == 0 or rng.uniform() < args.COARSE_SHARE
        size = (
            p
            if coarse
            else 32 * int(rng.integers(args.FINE_SIZE_MIN // 32, args.FINE_SIZE_MAX // 32 + 1))
        )
        if size not in views:
            fixed_view, view_from_fixed = square_view(fixed, size)
            moving_view, view_from_moving = square_view(moving, size)
            truth = view_from_fixed @ fixed_from_moving @ np.linalg.inv(view_from_moving)
            views[size] = (fixed_view, moving_view, truth, fov_mask(fixed_view))
        fixed_view, moving_view, truth, mask = views[size]
        c = ((size - 1) / 2, (size - 1) / 2)
        if attempt == 0:
            error = truth  # the moving view as it is: estimate = identity
        elif coarse and rng.uniform() < args.LARGE_SHARE:
            error = random_affine(
                rng, c, args.MAX_ROTATION_DEG, args.MAX_SCALE, args.MAX_SHEAR, args.MAX_SHIFT * size
            )
        else:
            error = random_affine(
                rng,
                c,
                args.RESIDUAL_ROTATION_DEG,
                args.RESIDUAL_SCALE,
                0.005,
                args.RESIDUAL_SHIFT * p,
            )
        # the moving view is warped by `estimate`; the target is fixedview_from_warped = error
        estimate = np.linalg.inv(error) @ truth
        warped = cv2.warpAffine(moving_view, estimate[:2], (size, size))
        left = top = 0
        if not coarse:
            left, top = (int(v) for v in rng.integers(0, size - p + 1, 2))
            if (
                np.count_nonzero(mask[top : top + p, left : left + p] == 0)
                > args.REJECT_BLACK_PIXELS
            ):
                continue
        local = to3x3(local_from_global(error, left, top))
        patches = [
            fixed_view[top : top + p, left : left + p],
            warped[top : top + p, left : left + p],
        ]
        xs.append(np.stack(patches, -1))
        ys.append((norm @ local @ np.linalg.inv(norm))[:2].astype(np.float32))
    return xs, ys


def write_shard(out, name, xs, ys):
    """Write a shard's two arrays under temporary names, then rename (never half a shard).

    Any older x is removed first and the new x is renamed last, so an ``-x.npy`` on disk always
    has its matching ``-y.npy`` from the same write, whenever the process is killed."""
    paths = {suffix: out / f"{name}-{suffix}.npy" for suffix in ("x", "y")}
    for suffix in ("x", "y"):
        paths[suffix].unlink(missing_ok=True)
    for suffix, array in (("y", np.stack(ys)), ("x", np.stack(xs))):
        tmp = out / f"{name}-{suffix}.npy.part"
        with open(tmp, "wb") as f:
            np.save(f, array)
        tmp.replace(paths[suffix])


def config_key(args):
    settings = {k: v for k, v in vars(args).items() if k != "OUT"}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def main(args):
    start = time.perf_counter()  # the manifest adds up the seconds of every run that wrote shards
    if args.WRITE_MOVED:
        return write_moved_folder(args)
    photos, failed_photos = load_photos(args)
    if args.WRITE_SAMPLE:
        if not photos:
            raise InputError(args.PHOTOS or "--retina", "no usable photographs for the sample")
        return write_fire_folder(photos, args)
    out = Path(args.OUT)
    out.mkdir(parents=True, exist_ok=True)
    fire_pairs, failed_fire = load_fire(args)
    if not photos and not fire_pairs:
        raise InputError(
            args.PHOTOS or args.FIRE or "sources",
            "no usable photographs or pairs (see --photos, --fire, --retina)",
        )
    sources = [p[0] for p in photos] + [p[0] for p in fire_pairs]  # names, by source index
    order = np.random.default_rng(args.SEED).permutation(len(sources))
    n_val = max(1, round(args.VAL_FRACTION * len(order))) if len(order) > 1 else 0
    split = {int(i): ("val" if rank < n_val else "train") for rank, i in enumerate(order)}
    # One unit = one pair (source index, pair number); a shard: PAIRS_PER_SHARD units of one split
    units = {"train": [], "val": []}
    for i in range(len(sources)):
        count = args.PAIRS_PER_PHOTO if i < len(photos) else args.REAL_REPEATS
        units[split[i]] += [(i, j) for j in range(count)]
    manifest_path = out / "manifest.json"
    key = config_key(args)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("config_key") != key:
        manifest = {"config_key": key, "shards": []}
    manifest.update(
        command=shlex.join(["python", *sys.argv]),
        config=vars(args),
        patch_size=args.PATCH_SIZE,
        failed=failed_photos + failed_fire,
        target_convention="fixedpatch_from_movingpatch, 2x3, normalised patch coordinates "
        "[-1, 1] (Network.py)",
        sources=sources,
        validation_sources=[sources[i] for i in range(len(sources)) if split[i] == "val"],
    )
    write_json(manifest_path, manifest)  # before any shard: never an old manifest over new shards
    done = {s["name"] for s in manifest["shards"] if (out / f"{s['name']}-x.npy").exists()}
    jobs = [
        (s, k, units[s][k : k + args.PAIRS_PER_SHARD])
        for s in ("train", "val")
        for k in range(0, len(units[s]), args.PAIRS_PER_SHARD)
    ]
    for failure in manifest["failed"]:
        print(f"warning: skipped {failure['source']}: {failure['reason']}")
    for s, k, chunk in tqdm(jobs, desc="shards", unit="shard"):
        name = f"{s}-{k // args.PAIRS_PER_SHARD:04d}"
        if name in done:
            continue
        xs, ys = [], []
        for i, j in chunk:
            rng = np.random.default_rng([args.SEED, i, j])
            if i < len(photos):
                fixed, moving, a, _ = synthetic_pair(rng, photos[i], args)
                fixed, moving = fixed[:, :, 1], moving[:, :, 1]  # green, as common.to_grey
            else:
                _, fixed, moving, a = fire_pairs[i - len(photos)]
                if j:  # repeats of a real pair: new exposure and blur on each side
                    fixed, moving = (
                        photometric(rng, cv2.merge([v] * 3), 0.5)[:, :, 1] for v in (fixed, moving)
                    )
            x, y = sample_patches(rng, fixed, moving, a, args)
            xs += x
            ys += y
        write_shard(out, name, xs, ys)
        manifest["shards"] = [sh for sh in manifest["shards"] if sh["name"] != name] + [
            {"name": name, "split": s, "count": len(xs)}
        ]
        manifest["seconds"] = round(manifest.get("seconds", 0) + time.perf_counter() - start, 1)
        start = time.perf_counter()
        write_json(manifest_path, manifest)
    counts = {
        s: sum(sh["count"] for sh in manifest["shards"] if sh["split"] == s)
        for s in ("train", "val")
    }
    print(
        f"{out}: {counts['train']} training and {counts['val']} validation patch pairs "
        f"in {len(manifest['shards'])} shards"
    )


if __name__ == "__main__":
    exit_on_input_error(lambda: main(cli(globals(), __doc__)))
