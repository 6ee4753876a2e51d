"""Shared pieces of the four scripts: image reading, the FIRE layout, geometry, metrics, the CLI.

Convention (used everywhere in this repository):
    Points are (x, y): x is the column, y the row, in pixels, origin at the centre of the top-left
    pixel (OpenCV's convention). A matrix named ``b_from_a`` maps points of frame ``a`` to frame
    ``b``: ``[x_b, y_b] = b_from_a @ [x_a, y_a, 1]``. 2x3 matrices are affine transforms; 3x3 ones
    are the same with the row ``[0, 0, 1]`` appended so they compose by ``@``.
    ``fixed_from_moving`` maps moving-image pixels to fixed-image pixels of the files as given
    (full resolution). As an affine it is exactly the ``M`` of ``cv2.warpAffine(moving, M,
    fixed_size)``, which lays the moving image over the fixed one; as a quadratic it is the 2x6
    ``M`` of ``[x', y'] = M @ [x, y, 1, xx, xy, yy]`` (class Transform, which maps, inverts,
    composes and warps either).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# TensorFlow's C++ log below errors is for its developers (CPU features, the model converter's
# steps): kept off the scripts' output unless asked for (read when TensorFlow is first imported;
# quiet_native_log holds the notices that TensorFlow writes before it reads it to it too).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MIN_SIDE = 32  # smaller images cannot be registered meaningfully
MAX_DECODED_SIDE = 2048  # larger images are decoded at a reduced size (bounded memory)
AUC_MAX_PX = 25.0  # FIRE protocol: success-rate curve from 0 to 25 px


class InputError(Exception):
    """A file the user gave cannot be used; ``str(e)`` is one line naming the file and why."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


# ----------------------------------------------------------------------------------------------
# TensorFlow, quietly

# What TensorFlow's and LiteRT's C++ code write straight to stderr, whatever TF_CPP_MIN_LOG_LEVEL
# says, and the level of each: absl's note that its log is not set up yet (TensorFlow's import
# logs before it is), absl-style lines ("I0000 00:00:... port.cc:153] oneDNN custom operations
# are on": Intel CPUs with AVX-512, where TensorFlow turns oneDNN on by itself, and wherever
# TF_ENABLE_ONEDNN_OPTS=1) and LiteRT's ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU").
_NATIVE_LOG = [
    (re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"), 0),
    (re.compile(r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] "), 0),
    (re.compile(r"W\d{4} [\d:.]+ +\d+ \S+:\d+\] "), 1),
    (re.compile(r"INFO: "), 0),
]


@contextlib.contextmanager
def quiet_native_log():
    """Hold what native code writes to stderr (file descriptor 2) inside the block, then write it
    out less the notices that TF_CPP_MIN_LOG_LEVEL (2 unless set: INFO and WARNING off) asks to
    leave out (_NATIVE_LOG). Everything else, errors and Python's own output included, comes out
    as it was, once the block ends. Neither TensorFlow nor LiteRT offers a setting for these:
    absl writes every line logged before its log is set up, and LiteRT's minimal logger its INFO,
    whatever the level."""
    level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = [
                line
                for line in lines
                if not any(p.match(line) and below < level for p, below in _NATIVE_LOG)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def import_tensorflow():
    """``import tensorflow``, inside quiet_native_log (the scripts' first import of TensorFlow,
    Keras' included, goes through here). Returns the module."""
    with quiet_native_log():
        import tensorflow

    return tensorflow


# ----------------------------------------------------------------------------------------------
# Images


@dataclasses.dataclass
class GreyImage:
    """One channel of a photograph, as registration uses it.

    pixels: uint8 (H, W), the green channel of a colour image (best vessel contrast in fundus
        photographs) or the grey image itself, possibly decoded at a reduced size.
    file_shape: (height, width) of the file as given.
    decoded_from_file: 3x3 matrix from file pixels to ``pixels`` coordinates.
    """

    pixels: np.ndarray
    file_shape: tuple
    decoded_from_file: np.ndarray


def scale_matrix(sx, sy=None):
    """3x3 matrix of a resize by (sx, sy) under OpenCV's pixel-centre convention."""
    sy = sx if sy is None else sy
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def to_grey(img, path="image"):
    """uint8 single channel of any decoded image: green of colour, alpha dropped, 16-bit scaled."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = img[:, :, 1]  # green in BGR, BGRA and RGB alike
    if img.dtype != np.uint8:
        img = img.astype(np.float32)
        top = float(img.max())
        img = np.zeros(img.shape, np.uint8) if top <= 0 else np.clip(img * (255.0 / top), 0, 255)
        img = img.astype(np.uint8)
    if img.ndim != 2:
        raise InputError(path, f"unsupported image layout {img.shape}")
    return np.ascontiguousarray(img)


def read_image(path, max_side=MAX_DECODED_SIDE):
    """Read a photograph for registration; raise InputError with one clear line if it cannot be.

    Large files are decoded at 1/2, 1/4 or 1/8 size (``cv2.IMREAD_REDUCED_*``) so memory stays
    bounded; ``decoded_from_file`` records the reduction so results stay in file pixels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        with Image.open(path) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError:
        raise InputError(path, "image is too large to decode safely") from None
    except Exception:
        raise InputError(path, "not an image file (cannot read its header)") from None
    if min(width, height) < MIN_SIDE:
        raise InputError(path, f"image is too small ({width}x{height} px, need {MIN_SIDE}+)")
    if _looks_truncated(path):
        raise InputError(path, "truncated JPEG (file ends before the image data does)")
    factor = 1  # decode at 1/2, 1/4 or 1/8 until the longest side is at most max_side
    while max(width, height) / factor > max_side and factor < 8:
        factor *= 2
    flags = {1: cv2.IMREAD_UNCHANGED, 2: cv2.IMREAD_REDUCED_COLOR_2}
    flags.update({4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8})
    if factor > 1:  # IMREAD_UNCHANGED ignores EXIF orientation; so must reduced reads (file px)
        flags[factor] |= cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imread(str(path), flags[factor])
    if img is None or img.size == 0:
        raise InputError(path, "cannot decode the image (corrupt or unsupported format)")
    grey = to_grey(img, path)
    if grey.max() == grey.min():
        raise InputError(path, "image has no content (every pixel has the same value)")
    sx, sy = grey.shape[1] / width, grey.shape[0] / height
    return GreyImage(grey, (height, width), scale_matrix(sx, sy))


def _looks_truncated(path):
    """JPEGs end with the EOI marker FFD9 (some writers pad or append a little after it);
    OpenCV decodes truncated ones silently as grey rows."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(max(2, path.stat().st_size - 1024))
        return b"\xff\xd9" not in f.read()  # FFD9 never occurs inside entropy-coded data


def fov_mask(grey, threshold=10):
    """uint8 mask (255 inside) of the camera's field of view: the largest bright blob, eroded."""
    small = cv2.GaussianBlur(grey, (5, 5), 0)
    mask = (small > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count > 1:
        mask = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    radius = max(1, min(grey.shape) // 100)
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
    return mask * 255


@dataclasses.dataclass
class Registration:
    """What every method returns: a failure is a value (matrix None, reason set), not a crash.

    fixed_from_moving: a Transform in file pixels (see the module's convention; an affine's 2x3
        matrix is taken as one), or None when it failed.
    confidence: in [0, 1], low when the method doubts its result (e.g. share of RANSAC inliers).
    """

    fixed_from_moving: "Transform" = None
    confidence: float = 0.0
    reason: str = None

    def __post_init__(self):
        if self.fixed_from_moving is not None:
            self.fixed_from_moving = as_transform(self.fixed_from_moving)


_CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


def square_view(grey, size, equalise=True):
    """The network's view of an image (training data and registration alike): padded to a
    centred square, resized to size x size, CLAHE (unless ``equalise`` is False). Returns
    (view uint8, view_from_image 3x3)."""
    h, w = grey.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = cv2.copyMakeBorder(
        grey, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT
    )
    view = cv2.resize(padded, (size, size), interpolation=cv2.INTER_AREA)
    return _CLAHE.apply(view) if equalise else view, square_frame(grey.shape, size)


def equalise(grey):
    """Contrast-limited histogram equalisation (CLAHE), as ``square_view`` applies it."""
    return _CLAHE.apply(np.ascontiguousarray(grey))


def square_frame(shape, size):
    """view_from_image (3x3) of ``square_view``: an image of ``shape`` (h, w) padded to a centred
    square and scaled to size x size."""
    h, w = shape[:2]
    side = max(h, w)
    return scale_matrix(size / side) @ translation((side - w) // 2, (side - h) // 2)


# ----------------------------------------------------------------------------------------------
# Affine geometry


def to3x3(a):
    """3x3 homogeneous form of a 2x3 (or 3x3) affine matrix."""
    a = np.asarray(a, np.float64)
    return a if a.shape == (3, 3) else np.vstack([a, [0.0, 0.0, 1.0]])


def rotation(degrees):
    """3x3 rotation by ``degrees`` about the origin; with y pointing down, a positive angle turns
    x towards y (clockwise as displayed)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def translation(dx, dy):
    return np.array([[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1.0]])


def apply_affine(a, points):
    """Map (N, 2) points (x, y) by the 2x3 or 3x3 affine ``a``."""
    a = np.asarray(a, np.float64)  # its first two rows are all that is used: no 3x3 copy
    return np.asarray(points, np.float64) @ a[:2, :2].T + a[:2, 2]


def fit_affine(src, dst, weights=None):
    """Least-squares affine ``dst_from_src`` (2x3) and the residual distances of each point;
    with ``weights``, each point's squared residual counts that many times (weighted least
    squares: weights are inverse variances).

    Raises ValueError when the points do not define an affine (fewer than 3, or collinear).
    numpy's least squares, not scikit-image's AffineTransform.from_estimate (the same fit): this
    runs six times per registration in the network's patch stage, where scikit-image's overhead
    was 3 ms of a 20 ms registration.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if len(src) < 3:
        raise ValueError(f"need at least 3 point pairs, got {len(src)}")
    spread = np.linalg.svd(src - np.add.reduce(src) / len(src), compute_uv=False)  # (mean: slow)
    if spread[1] <= 1e-6 * max(spread[0], 1e-12):
        raise ValueError("the points are collinear: they do not define an affine transform")
    design, target = np.ones((len(src), 3)), dst  # rows (x, y, 1)
    design[:, :2] = src
    if weights is not None:  # weighted least squares: each row scaled by its weight's root
        root = np.sqrt(np.asarray(weights, np.float64))[:, None]
        design, target = design * root, target * root
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)  # (3, 2): dst = design @ solution
    fit = solution.T
    if not np.isfinite(fit).all():
        raise ValueError("points do not define an affine transform")
    miss = apply_affine(fit, src) - dst
    return fit, np.sqrt(np.add.reduce(miss * miss, axis=1))  # (np.linalg.norm: slow)


MODELS = ("affine", "quadratic")  # the models a Transform holds (Testing.py --transform)


class Transform:
    """A map of (x, y) points by one of MODELS. In a Registration it is ``fixed_from_moving``:
    moving-file pixels to fixed-file pixels (the module's convention), with

        affine      [x', y'] = M @ [x, y, 1]                          M: 2x3
        quadratic   [x', y'] = M @ [x, y, 1, x * x, x * y, y * y]     M: 2x6

    ``matrix`` is M. The quadratic is retinal registration's 12-parameter transform (Can et al.:
    a spherical retina seen by a weak-perspective camera, the map between two views of it when
    the eye turns); its first three columns are an affine, the last three bend it. scikit-image's
    ``PolynomialTransform`` (order 2) takes the same 12 numbers in the order 1, x, y, xx, xy, yy.

    Calling it maps points; ``inverse`` maps fixed points back (Newton's method for the
    quadratic, which has no closed-form inverse); ``compose`` puts affine frames (3x3) on either
    side; ``warp`` lays a moving image over the fixed one (cv2.warpAffine, cv2.remap for the
    quadratic). Code that registers, scores or draws takes a Transform and never asks its model.
    """

    def __init__(self, matrix):
        m = np.array(matrix, np.float64)
        if m.shape == (3, 3) and not np.array_equal(m[2], [0.0, 0.0, 1.0]):
            raise ValueError("a 3x3 matrix whose last row is not [0, 0, 1] is not an affine")
        m = m[:2] if m.shape == (3, 3) else m
        if m.shape not in ((2, 3), (2, 6)):
            raise ValueError(f"a transform is a 2x3 (affine) or 2x6 (quadratic) matrix: {m.shape}")
        self.matrix = m
        self.model = MODELS[m.shape[1] == 6]

    def __repr__(self):
        return f"Transform({self.model}, {np.round(self.matrix, 6).tolist()})"

    def __call__(self, points):
        """(N, 2) points -> (N, 2) points."""
        p = np.asarray(points, np.float64).reshape(-1, 2)
        out = p @ self.matrix[:, :2].T + self.matrix[:, 2]
        if self.model == "quadratic":
            x, y = p[:, 0], p[:, 1]
            out += np.stack([x * x, x * y, y * y], 1) @ self.matrix[:, 3:].T
        return out

    def jacobian(self, points):
        """(N, 2, 2): d(x', y') / d(x, y) at each point."""
        p = np.asarray(points, np.float64).reshape(-1, 2)
        jac = np.repeat(self.matrix[None, :, :2], len(p), axis=0)
        if self.model == "quadratic":
            x, y = p[:, 0, None], p[:, 1, None]
            m = self.matrix
            jac[:, :, 0] += 2 * m[:, 3] * x + m[:, 4] * y
            jac[:, :, 1] += m[:, 4] * x + 2 * m[:, 5] * y
        return jac

    def inverse(self, points, tolerance=1e-4, iterations=20):
        """(N, 2) fixed points -> the moving points that map onto them: exact for an affine;
        for a quadratic, Newton's method from the affine part's inverse, until no point moves by
        more than ``tolerance`` px (a few steps where it bends by tens of pixels). Where the
        quadratic folds (its Jacobian singular: far outside the region it was fitted on), NaN."""
        q = np.asarray(points, np.float64).reshape(-1, 2)
        p = apply_affine(np.linalg.inv(to3x3(self.matrix[:, :3])), q)
        if self.model == "affine":
            return p
        (ax, bx, cx, dx, ex, fx), (ay, by, cy, dy, ey, fy) = self.matrix
        x, y = p[:, 0].copy(), p[:, 1].copy()
        with np.errstate(divide="ignore", invalid="ignore"):  # a fold: NaN, below
            for _ in range(iterations):  # the map and its Jacobian written out: this runs on
                # every patch pass of a quadratic, where NumPy's overhead per call counts
                xx, xy, yy = x * x, x * y, y * y
                rx = ax * x + bx * y + cx + dx * xx + ex * xy + fx * yy - q[:, 0]
                ry = ay * x + by * y + cy + dy * xx + ey * xy + fy * yy - q[:, 1]
                j00, j01 = ax + 2 * dx * x + ex * y, bx + ex * x + 2 * fx * y
                j10, j11 = ay + 2 * dy * x + ey * y, by + ey * x + 2 * fy * y
                det = j00 * j11 - j01 * j10
                step_x, step_y = (j11 * rx - j01 * ry) / det, (j00 * ry - j10 * rx) / det
                x -= step_x
                y -= step_y
                if not np.nanmax(np.abs(step_x) + np.abs(step_y), initial=0.0) > tolerance:
                    break
        p = np.stack([x, y], 1)
        p[~(np.abs(self(p) - q) <= 10 * tolerance).all(axis=1)] = np.nan  # did not converge
        return p

    def local_inverse(self, points, tolerance=1e-4):
        """(N, 3, 3): at each fixed point q, the affine that maps fixed points near q to moving
        ones, exact at q (the inverse's first-order expansion there); an affine's own inverse."""
        if self.model == "affine":
            return np.broadcast_to(np.linalg.inv(to3x3(self.matrix)), (len(points), 3, 3)).copy()
        q = np.asarray(points, np.float64).reshape(-1, 2)
        p = self.inverse(q, tolerance)
        inv = np.linalg.inv(self.jacobian(p))
        local = np.zeros((len(q), 3, 3))
        local[:, :2, :2], local[:, 2, 2] = inv, 1.0
        local[:, :2, 2] = p - np.einsum("nij,nj->ni", inv, q)
        return local

    def compose(self, left=None, right=None):
        """``left`` after this transform after ``right`` (3x3 affines, either None): the transform
        ``left @ M @ right`` where M is an affine's 3x3 matrix. It converts between frames, e.g.
        from decoded to file pixels: ``t.compose(inv(fixed.decoded_from_file),
        moving.decoded_from_file)``."""
        left = np.eye(3) if left is None else to3x3(left)
        right = np.eye(3) if right is None else to3x3(right)
        if self.model == "affine":
            return Transform(left @ to3x3(self.matrix) @ right)
        # each output coordinate is z' H z with z = (x, y, 1) and H symmetric: z = R z' gives
        # R' H R, and the left affine mixes the two H (and adds its shift to the constant)
        h = np.zeros((2, 3, 3))
        for i, (mx, my, m1, mxx, mxy, myy) in enumerate(self.matrix):
            h[i] = [[mxx, mxy / 2, mx / 2], [mxy / 2, myy, my / 2], [mx / 2, my / 2, m1]]
        h = right.T @ h @ right
        h = np.einsum("ij,jkl->ikl", left[:2, :2], h)
        h[:, 2, 2] += left[:2, 2]
        return Transform(
            np.stack(
                [
                    2 * h[:, 0, 2],
                    2 * h[:, 1, 2],
                    h[:, 2, 2],
                    h[:, 0, 0],
                    2 * h[:, 0, 1],
                    h[:, 1, 1],
                ],
                1,
            )  # fmt: skip
        )

    def warp(self, moving, shape, interpolation=cv2.INTER_LINEAR):
        """The moving image (H', W') laid over the fixed one, of ``shape`` (H, W): pixel p of the
        output shows moving at ``inverse(p)`` (this transform maps moving pixels to fixed ones in
        the images' own pixels; compose it with their frames first), sampled by OpenCV's
        ``interpolation``. Outside moving: 0."""
        h, w = shape[:2]
        if self.model == "affine":
            return cv2.warpAffine(moving, self.matrix, (w, h), flags=interpolation)
        # the inverse on every 8th pixel, interpolated bilinearly in between (by cv2.remap itself:
        # node k of the coarse map is pixel 8 k), within 1e-3 px of the inverse at every pixel
        step = 8
        ys, xs = np.mgrid[0 : h + step : step, 0 : w + step : step]
        nodes = self.inverse(np.stack([xs.ravel(), ys.ravel()], 1))
        nodes = np.nan_to_num(nodes, nan=-1e6).reshape(*xs.shape, 2).astype(np.float32)
        grid_x = np.broadcast_to(np.arange(w, dtype=np.float32) / step, (h, w))
        grid_y = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None] / step, (h, w))
        where = cv2.remap(nodes, np.ascontiguousarray(grid_x), np.ascontiguousarray(grid_y),
                          cv2.INTER_LINEAR)  # fmt: skip
        return cv2.remap(moving, where[..., 0], where[..., 1], interpolation)


def as_transform(t):
    """A Transform from a Transform or a 2x3, 3x3 or 2x6 matrix."""
    return t if isinstance(t, Transform) else Transform(t)


def fit_transform(src, dst, model="affine", weights=None):
    """Least-squares ``dst_from_src`` Transform of ``model`` and each point's residual distance
    (weights as fit_affine's). Raises ValueError when the points do not define one: an affine
    needs 3 points not on a line, a quadratic 6 not on one conic. The quadratic is fitted in
    coordinates centred and scaled by the points' spread (x * x of a pixel coordinate is in the
    millions: the design would be ill-conditioned) and brought back by ``compose``."""
    if model == "affine":
        fit, residual = fit_affine(src, dst, weights)
        return Transform(fit), residual
    if model != "quadratic":
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if len(src) < 6:
        raise ValueError(f"need at least 6 point pairs for a quadratic, got {len(src)}")
    centre = src.mean(axis=0)
    spread = max(np.sqrt(((src - centre) ** 2).sum(axis=1).mean()), 1e-12)
    norm_from_src = np.array([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, spread]]) / spread
    n = apply_affine(norm_from_src, src)
    x, y = n[:, 0], n[:, 1]
    design = np.stack([x, y, np.ones_like(x), x * x, x * y, y * y], 1)
    target = dst
    if weights is not None:
        root = np.sqrt(np.asarray(weights, np.float64))[:, None]
        design, target = design * root, target * root
    solution, _, _, singular = np.linalg.lstsq(design, target, rcond=None)
    if not singular[-1] > 1e-8 * singular[0]:
        raise ValueError("the points do not define a quadratic (they lie on one conic)")
    fit = Transform(solution.T).compose(right=norm_from_src)
    if not np.isfinite(fit.matrix).all():
        raise ValueError("points do not define a quadratic transform")
    miss = np.stack([x, y, np.ones_like(x), x * x, x * y, y * y], 1) @ solution - dst
    return fit, np.sqrt(np.add.reduce(miss * miss, axis=1))


def local_from_global(fixed_from_moving, left, top):
    """A full-image matrix re-expressed for the patch whose top-left pixel is (left, top).

    Both patches sit at the same place in fixed and moving images; the linear part is unchanged
    and ``t_local = A (left, top, 1) - (left, top)`` (the prototype's formula).
    """
    return (translation(-left, -top) @ to3x3(fixed_from_moving) @ translation(left, top))[:2]


def global_from_local(local, left, top):
    """Inverse of local_from_global: ``t_global = t_local + (left, top) - L (left, top)``."""
    return (translation(left, top) @ to3x3(local) @ translation(-left, -top))[:2]


def norm_from_pixels(size):
    """3x3 from pixel coordinates of a size x size patch to [-1, 1] (pixel centres)."""
    s = 2.0 / size
    return np.array([[s, 0, s * 0.5 - 1], [0, s, s * 0.5 - 1], [0, 0, 1.0]])


# ----------------------------------------------------------------------------------------------
# FIRE layout and its metrics


@dataclasses.dataclass
class FirePair:
    """One pair of the FIRE layout. ``points`` is (N, 4) ``x_fixed y_fixed x_moving y_moving``."""

    pair: str
    category: str
    fixed: Path
    moving: Path
    points: np.ndarray = None
    problem: str = None


def read_control_points(path):
    """(N, 4) float array from a FIRE control-point file; InputError if it is malformed."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "control-point file not found")
    rows = [line.split() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        if len(row) != 4:
            raise InputError(path, f"line {number} has {len(row)} columns, expected 4")
    try:
        points = np.array(rows, np.float64).reshape(-1, 4)
    except ValueError:
        raise InputError(path, "contains values that are not numbers") from None
    if len(points) < 3:
        raise InputError(path, f"has {len(points)} control points, need at least 3")
    if not np.all(np.isfinite(points)):
        raise InputError(path, "contains values that are not finite numbers")
    return points


def read_fire(root):
    """Pairs of a FIRE-layout folder: ``Images/<ID>_1.jpg`` (fixed), ``Images/<ID>_2.jpg``
    (moving), ``Ground Truth/control_points_<ID>_1_2.txt``; category = first letter of the ID.

    A pair whose files are missing or malformed is returned with ``problem`` set, not dropped.
    """
    root = Path(root)
    images = root / "Images"
    if not images.is_dir():
        raise InputError(root, "not a FIRE-layout folder (no Images/ subfolder)")
    ids = sorted({p.stem.rsplit("_", 1)[0] for p in images.glob("*_[12].*")})
    if not ids:
        raise InputError(images, "no images named <ID>_1.jpg / <ID>_2.jpg")
    pairs = []
    for pair_id in ids:
        found = {i: sorted(images.glob(f"{pair_id}_{i}.*")) for i in (1, 2)}
        fixed = found[1][0] if found[1] else images / f"{pair_id}_1.jpg"
        moving = found[2][0] if found[2] else images / f"{pair_id}_2.jpg"
        item = FirePair(pair_id, pair_id[0].upper(), fixed, moving)
        gt = root / "Ground Truth" / f"control_points_{pair_id}_1_2.txt"
        try:
            for path in (fixed, moving):
                if not path.exists():
                    raise InputError(path, "partner image missing")
            item.points = read_control_points(gt)
        except InputError as e:
            item.problem = str(e)
        pairs.append(item)
    return pairs


def fire_error(fixed_from_moving, points):
    """FIRE error: mean distance (px) from the fixed points to the moving points mapped by
    ``fixed_from_moving`` (a Transform, or an affine's matrix)."""
    if fixed_from_moving is None:
        return float("inf")
    mapped = as_transform(fixed_from_moving)(points[:, 2:4])
    return float(np.linalg.norm(mapped - points[:, 0:2], axis=1).mean())


def success_auc(errors, max_px=AUC_MAX_PX):
    """Area under the success-rate curve (share of pairs with error <= t, t in [0, max_px]),
    normalised to [0, 1]. Exactly mean(max(0, 1 - e / max_px)); failures (inf) count as 0."""
    errors = np.asarray(errors, np.float64)
    if errors.size == 0:
        return float("nan")
    return float(np.mean(np.clip(1.0 - errors / max_px, 0.0, 1.0)))


def is_inaccurate(fixed_from_moving, points):
    """FIRE's 'inaccurate': max error > 50 px or median error > 20 px."""
    mapped = as_transform(fixed_from_moving)(points[:, 2:4])
    d = np.linalg.norm(mapped - points[:, 0:2], axis=1)
    return bool(d.max() > 50 or np.median(d) > 20)


# ----------------------------------------------------------------------------------------------
# Command line and files


def cli(defaults, doc, argv=None):
    """Parse flags named after the UPPERCASE constants a script assigns at its top level
    (``BATCH_SIZE`` -> --batch-size); names it imports are not its own and get no flag.

    ``defaults`` is the script's ``globals()``: the constants are the defaults, and the type of
    each default is the flag's type (None -> str)."""
    import ast

    own = None
    if defaults.get("__file__"):
        tree = ast.parse(Path(defaults["__file__"]).read_text())
        own = {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in defaults.items():
        if not name.isupper() or name.startswith("_") or (own is not None and name not in own):
            continue
        if not isinstance(value, (int, float, str, bool, type(None))):
            continue
        kind = _parse_bool if isinstance(value, bool) else str if value is None else type(value)
        flag = "--" + name.lower().replace("_", "-")
        parser.add_argument(flag, dest=name, type=kind, default=value, help=f"default: {value}")
    return parser.parse_args(argv)


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def write_atomic(path, data):
    """Write bytes or text so that ``path`` is either absent, old, or complete (never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, default=float) + "\n")


def exit_on_input_error(main):
    """Run ``main``; an InputError becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
