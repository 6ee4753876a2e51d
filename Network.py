"""Network.py - step 2 of 4: the registration network, and how it registers a pair of images.

The network is the prototype's STN-like localisation network made light and made to match:
    encoder: by default (CORRELATION_RADIUS = -1) a siamese encoder, the same convolutions over
        the fixed and over the moving patch, to 1/4 resolution; a global cost volume (every fixed
        cell against every moving cell, one matrix product) and its soft-argmax read-out, the
        displacement of every fixed cell; further convolutions over the cost volume.
        CORRELATION_RADIUS = 0 is the prototype's early fusion (the two patches stacked as two
        channels into one encoder); r > 0 a local cost volume of radius r.
    heads: three PARALLEL fully connected heads, translation (a02, a12), scale (a00, a11) and
        rotation (a01, a10), whose last layers start at the identity transform (the prototype's);
        they see the convolutional features and the displacements.
    A fourth output, ``matrix``, assembles the heads into the 2x3 matrix.

Convention of the network's output:
    ``matrix`` is ``fixedpatch_from_movingpatch`` in NORMALISED patch coordinates: (x, y) of a
    pixel centre mapped to [-1, 1] by ``common.norm_from_pixels(size)`` (so identity is
    [[1, 0, 0], [0, 1, 0]] whatever the patch size, and translation is in half-patch units).
    ``NetRegistrar`` turns it into ``fixed_from_moving`` in the caller's file pixels.

How a pair is registered (``NetRegistrar.register``), coarse to fine:
    1. coarse (the network): both whole images, padded square, resized to INPUT_SIZE, CLAHE; the
       network predicts the motion; the moving view is re-warped by the estimate and the network
       predicts the residual, COARSE_ITERATIONS times (iterative refinement).
    2. fine: both images at FINE_SIZE px, the moving one warped by the coarse estimate; up to
       FINE_PATCHES patches where the two fields of view overlap each estimate a local residual, by
       phase correlation (REFINE = phase: closed form, sub-pixel, translation only) or by the
       network (REFINE = net); each is taken back to full-image coordinates (the prototype's
       ``t_global`` formula) and ONE affine is fitted, robustly, to the points the patches move
       (AGGREGATE: least squares refitted without outliers by default), FINE_ITERATIONS times.
       Optionally POLISH_ITERATIONS of ECC.
    3. confidence: the share of patches whose motion, measured in the last fine iteration, agrees
       with the fitted affine within AGREE_PX fine-view pixels. Right, the patches all tell one
       story; wrong, they measure unrelated shifts and few agree. Below RETRY_BELOW, registration
       is retried until a result is confident, keeping the most confident: first the fine stage
       from the identity (the network's guess can be wrong where the images differ most in
       appearance, and a small motion is within the patches' own reach), then the network from
       8 starts shifted by RETRY_SHIFT of the side (a motion beyond the network's training range).
       Without the fine stage (FINE_SIZE = 0) there is no retry, and the confidence is the
       normalised cross-correlation of the fixed and warped moving views in the fixed field of
       view (blind to errors of a pixel or two at 64 px, i.e. 20-30 px at 768 px).

Run ``python Network.py`` to print the default network's parameter count and CPU time per patch.
"""

import time

import cv2
import keras
import numpy as np

from common import (
    GreyImage,
    InputError,
    Registration,
    cli,
    exit_on_input_error,
    fit_affine,
    fov_mask,
    global_from_local,
    norm_from_pixels,
    scale_matrix,
    square_view,
    to3x3,
    translation,
)

# Architecture (the defaults of build_network)
INPUT_SIZE = 64  # patch side in pixels (the coarse pass sees the whole image at this size)
WIDTHS = "16,32,48,64"  # channels of the encoder's stride-2 stages (comma separated)
HEAD_WIDTH = 128  # units of each head's two hidden layers
DROPOUT = 0.2
CORRELATION_RADIUS = -1  # 0: stacked patches (prototype); r > 0: siamese encoder + cost volume
# of displacements up to r cells; -1: siamese encoder + global (all pairs) cost volume
SIAMESE_STAGES = 2  # with a cost volume: encoder stages shared by both patches before it
# Registration procedure (the defaults of NetRegistrar)
COARSE_ITERATIONS = 2
FINE_SIZE = 384  # 0 = coarse only
FINE_PATCHES = 40
FINE_PATCH = 64  # side of the fine patches with REFINE = phase (with net: INPUT_SIZE)
FINE_ITERATIONS = 3
REFINE = "phase"  # fine stage: net (the network on patches) or phase (phase correlation)
POLISH_ITERATIONS = 0  # ECC steps on vessel edges after the fine stage (0 = none)
AGGREGATE = "trimmed"  # how patch estimates combine: trimmed or lmeds (robust fits), mean
AGREE_PX = 3.0  # a patch agrees with the fitted affine within this many fine-view pixels
RETRY_BELOW = 0.5  # under this confidence, retry: the patches from the identity, then the
# network from 8 starts shifted by RETRY_SHIFT of the side (until one is confident)
RETRY_SHIFT = 0.25  # 0 = no shifted starts
THREADS = 2
# `python Network.py`: time this many patches
TIME_PATCHES = 200


# ----------------------------------------------------------------------------------------------
# The network


@keras.saving.register_keras_serializable(package="fundusreg")
class AffineFromHeads(keras.layers.Layer):
    """(translation, scale, rotation), each (B, 2) -> (B, 2, 3) [[a00 a01 a02], [a10 a11 a12]]."""

    def call(self, translation, scale, rotation):
        ops = keras.ops
        row0 = ops.stack([scale[:, 0], rotation[:, 0], translation[:, 0]], axis=-1)
        row1 = ops.stack([rotation[:, 1], scale[:, 1], translation[:, 1]], axis=-1)
        return ops.stack([row0, row1], axis=1)


@keras.saving.register_keras_serializable(package="fundusreg")
class CornerLoss(keras.losses.Loss):
    """Mean displacement of the 4 patch corners between the true and the predicted normalised
    matrices, in pixels of a patch of side ``2 * half_size``: what registration cares about."""

    def __init__(self, half_size=INPUT_SIZE / 2, name="corner_px", **kwargs):
        super().__init__(name=name, **kwargs)
        self.half_size = float(half_size)

    def call(self, y_true, y_pred):
        ops = keras.ops
        corners = ops.convert_to_tensor(
            [[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
        )
        diff = ops.einsum(
            "bij,kj->bki", ops.cast(y_pred, "float32") - ops.cast(y_true, "float32"), corners
        )
        return (
            ops.mean(ops.sqrt(ops.sum(ops.square(diff), axis=-1) + 1e-12), axis=-1) * self.half_size
        )

    def get_config(self):
        return {**super().get_config(), "half_size": self.half_size}


def _head(features, name, bias, head_width, dropout):
    """FC -> Dropout -> FC -> FC 2, the prototype's head. Leaky ReLU, not ReLU: with the last layer
    starting at zero, plain ReLU heads died early in training here (the rotation head's units all
    went negative and it kept predicting 0 for every pair)."""
    x = keras.layers.Dense(head_width, activation="leaky_relu", name=f"{name}_fc1")(features)
    x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Dense(head_width, activation="leaky_relu", name=f"{name}_fc2")(x)
    return keras.layers.Dense(
        2,
        name=name,
        kernel_initializer="zeros",  # identity transform at the start (the prototype's init)
        bias_initializer=keras.initializers.Constant(bias),
    )(x)


@keras.saving.register_keras_serializable(package="fundusreg")
class TakeChannel(keras.layers.Layer):
    """(B, H, W, C) -> (B, H, W, 1): one channel (the fixed or the moving patch)."""

    def __init__(self, index, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        return x[..., self.index : self.index + 1]

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="fundusreg")
class Correlation(keras.layers.Layer):
    """Cost volume: for every displacement (dx, dy) in [-radius, radius]^2, the mean over channels
    of fixed(x, y) * moving(x + dx, y + dy); (B, H, W, C) x2 -> (B, H, W, (2 radius + 1)^2)."""

    def __init__(self, radius, **kwargs):
        super().__init__(**kwargs)
        self.radius = int(radius)

    def call(self, fixed, moving):
        ops, r = keras.ops, self.radius
        h, w = fixed.shape[1], fixed.shape[2]
        padded = ops.pad(moving, [[0, 0], [r, r], [r, r], [0, 0]])
        costs = [
            ops.mean(fixed * padded[:, r + dy : r + dy + h, r + dx : r + dx + w, :], axis=-1)
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ]
        return ops.stack(costs, axis=-1)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius}


@keras.saving.register_keras_serializable(package="fundusreg")
class GlobalCorrelation(keras.layers.Layer):
    """All-pairs cost volume (DGC-Net's global correlation): for every fixed cell, its correlation
    with every moving cell; (B, H, W, C) x2 -> (B, H, W, H * W). One batched matrix product, so
    any displacement is seen, however large."""

    def call(self, fixed, moving):
        ops = keras.ops
        h, w, c = fixed.shape[1], fixed.shape[2], fixed.shape[3]
        f = ops.reshape(fixed, (-1, h * w, c))
        m = ops.reshape(moving, (-1, h * w, c))
        return ops.reshape(ops.matmul(f, ops.transpose(m, (0, 2, 1))), (-1, h, w, h * w))


@keras.saving.register_keras_serializable(package="fundusreg")
class SoftArgmaxFlow(keras.layers.Layer):
    """Global cost volume (B, H, W, H * W) -> displacement of every fixed cell (B, H, W, 2), in
    normalised coordinates: the softmax-weighted mean position of the moving cells it matches,
    minus its own position. A differentiable, closed-form read-out of the matches, from which an
    affine is a linear function: the heads learn it fast."""

    def __init__(self, temperature=20.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, cost):
        ops = keras.ops
        h, w = cost.shape[1], cost.shape[2]
        ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        grid = ops.convert_to_tensor(np.stack([xs, ys], -1).reshape(h * w, 2).astype("float32"))
        weights = ops.softmax(cost * self.temperature, axis=-1)
        matched = ops.reshape(
            ops.matmul(ops.reshape(weights, (-1, h * w, h * w)), grid), (-1, h, w, 2)
        )
        return matched - ops.reshape(grid, (1, h, w, 2))

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def _stage(x, width, name):
    """Conv 3x3 stride 2, then conv 3x3 stride 1, each with BatchNorm and ReLU."""
    for stride in (2, 1):
        x = keras.layers.Conv2D(width, 3, stride, "same", use_bias=False, name=f"{name}_{stride}")(
            x
        )
        x = keras.layers.BatchNormalization(name=f"{name}_bn{stride}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{stride}")(x)
    return x


def build_network(
    input_size=INPUT_SIZE,
    widths=WIDTHS,
    head_width=HEAD_WIDTH,
    dropout=DROPOUT,
    correlation=CORRELATION_RADIUS,
    siamese_stages=SIAMESE_STAGES,
):
    """Keras model: (B, input_size, input_size, 2) uint8-range floats (fixed, moving) -> dict of
    ``translation``, ``scale``, ``rotation`` (B, 2) and ``matrix`` (B, 2, 3), normalised coords.

    correlation = 0: the prototype's early fusion, one encoder over the two stacked patches.
    correlation = r > 0: one shared (siamese) encoder of the first ``siamese_stages`` stages
    over each patch, a cost volume of displacements up to r feature cells (r * 2^stages px),
    then the other stages. correlation < 0: the same with a global (all pairs) cost volume."""
    widths = [int(w) for w in str(widths).split(",")]
    inputs = keras.Input((input_size, input_size, 2), name="fixed_moving")
    x = keras.layers.Rescaling(1 / 255.0, name="to_unit")(inputs)
    stages = list(enumerate(widths))
    if correlation:
        single = keras.Input((input_size, input_size, 1), name="patch")
        f = single
        for i, width in stages[:siamese_stages]:
            f = _stage(f, width, f"siamese{i}")
        f = keras.layers.UnitNormalization(axis=-1, name="unit_features")(f)
        encoder = keras.Model(single, f, name="siamese_encoder")
        fixed = encoder(TakeChannel(0, name="fixed")(x))
        moving = encoder(TakeChannel(1, name="moving")(x))
        if correlation > 0:
            x = Correlation(correlation, name="correlation")(fixed, moving)
        else:
            x = GlobalCorrelation(name="correlation")(fixed, moving)
            flow = keras.layers.Flatten(name="flow")(SoftArgmaxFlow(name="matches")(x))
        stages = stages[siamese_stages:]
    for i, width in stages:
        x = _stage(x, width, f"conv{i}")
    features = keras.layers.Flatten(name="flatten")(x)
    if correlation < 0:  # the heads see the matches' displacements beside the conv features
        features = keras.layers.Concatenate(name="features")([features, flow])
    heads = {
        "translation": _head(features, "translation", [0.0, 0.0], head_width, dropout),
        "scale": _head(features, "scale", [1.0, 1.0], head_width, dropout),
        "rotation": _head(features, "rotation", [0.0, 0.0], head_width, dropout),
    }
    matrix = AffineFromHeads(name="matrix")(heads["translation"], heads["scale"], heads["rotation"])
    return keras.Model(inputs, {**heads, "matrix": matrix}, name="fundusreg")


def load_network(path):
    """Load a ``.keras`` model in safe mode (no pickled code); a clear error if it is not one."""
    import zipfile
    from pathlib import Path

    if not str(path).endswith(".keras"):
        raise InputError(path, "not a .keras model file")
    if not Path(path).is_file():
        raise InputError(path, "model file not found")
    if not zipfile.is_zipfile(path):  # e.g. an HDF5 or pickle file renamed, or a truncated one
        raise InputError(path, "not a Keras model archive (.keras files are zip archives)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types for a bad archive
        raise InputError(path, f"cannot load the model ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# Registration with a trained network


class NetRegistrar:
    """Registers pairs with a trained network, coarse to fine (see the module docstring)."""

    def __init__(
        self,
        model,
        coarse_iterations=COARSE_ITERATIONS,
        fine_size=FINE_SIZE,
        fine_patches=FINE_PATCHES,
        fine_patch=FINE_PATCH,
        fine_iterations=FINE_ITERATIONS,
        aggregate=AGGREGATE,
        refine=REFINE,
        polish_iterations=POLISH_ITERATIONS,
        agree_px=AGREE_PX,
        retry_below=RETRY_BELOW,
        retry_shift=RETRY_SHIFT,
    ):
        import tensorflow as tf

        if aggregate not in ("lmeds", "trimmed", "mean"):
            raise ValueError(f"aggregate must be lmeds, trimmed or mean, not {aggregate!r}")
        if refine not in ("net", "phase"):
            raise ValueError(f"refine must be net or phase, not {refine!r}")
        self.model = model
        self.size = int(model.input_shape[1])
        self.coarse_iterations, self.fine_size = coarse_iterations, fine_size
        self.fine_patches, self.fine_iterations = fine_patches, fine_iterations
        self.fine_patch = fine_patch if refine == "phase" else self.size  # the net: its input
        self.aggregate, self.refine, self.polish_iterations = aggregate, refine, polish_iterations
        self.agree_px, self.retry_below = agree_px, retry_below
        # starts for a low-confidence retry: the moving view shifted by retry_shift of its side
        # in 8 directions, which puts a larger motion back within the network's training range
        step = retry_shift * self.size
        self._starts = [
            translation(dx * step, dy * step)
            for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
            if step
        ]
        spec = tf.TensorSpec((None, self.size, self.size, 2), tf.float32)

        def matrix(x):
            return model(x, training=False)["matrix"]

        # XLA-compiled: 1.7 ms instead of 2.4 ms a call on 2 cores, the same matrices
        self._predict = tf.function(matrix, input_signature=[spec], jit_compile=True)
        self._window = cv2.createHanningWindow((self.fine_patch,) * 2, cv2.CV_32F)
        self.warm_up()

    def warm_up(self):
        """Run the whole procedure once on a made-up pair (traces the TensorFlow graph, starts
        OpenCV's threads), so that the clock of the first real pair measures registration."""
        disc = np.zeros((512, 512), np.uint8)
        cv2.circle(disc, (256, 256), 240, 255, -1)
        noise = np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)
        image = GreyImage(cv2.GaussianBlur(noise, (0, 0), 3) & disc, (512, 512), np.eye(3))
        self.register(image, image)

    def predict(self, fixed_patches, moving_patches):
        """(K, P, P) uint8 pairs -> (K, 3, 3) ``fixedpatch_from_movingpatch`` in patch pixels."""
        x = np.stack([fixed_patches, moving_patches], axis=-1).astype(np.float32)
        norm = np.asarray(self._predict(x), np.float64)
        n = norm_from_pixels(self.size)
        return np.linalg.inv(n) @ np.stack([to3x3(m) for m in norm]) @ n

    def phase(self, fixed_patches, moving_patches):
        """Closed-form alternative to ``predict`` for small residuals: each patch's translation by
        phase correlation (OpenCV, sub-pixel), as a (K, 3, 3) ``fixedpatch_from_movingpatch``."""
        local = np.tile(np.eye(3), (len(fixed_patches), 1, 1))
        for k, (f, m) in enumerate(zip(fixed_patches, moving_patches)):
            (dx, dy), _ = cv2.phaseCorrelate(np.float32(f), np.float32(m), self._window)
            local[k, :2, 2] = -dx, -dy  # m is f shifted by (dx, dy)
        return local

    def register(self, fixed, moving):
        """GreyImage pair -> Registration with ``fixed_from_moving`` in file pixels."""
        coarse = [square_view(image.pixels, self.size)[0] for image in (fixed, moving)]
        fine_size = self.fine_size or self.size
        (fixed_view, view_from_fixed), (moving_view, view_from_moving) = (
            square_view(image.pixels, fine_size) for image in (fixed, moving)
        )
        fine = (fixed_view, moving_view, fov_mask(fixed_view), fov_mask(moving_view))
        a, confidence = self._attempt(coarse, fine, np.eye(3), self.coarse_iterations)
        if confidence < self.retry_below and self.coarse_iterations and self.fine_size:
            # the patches from the identity, then the network from shifted starts
            tries = [(np.eye(3), 0)] + [(start, self.coarse_iterations) for start in self._starts]
            for start, passes in tries:
                retry, retry_confidence = self._attempt(coarse, fine, start, passes)
                if retry_confidence > confidence:
                    a, confidence = retry, retry_confidence
                if confidence >= self.retry_below:
                    break
        file_from_fixed = np.linalg.inv(view_from_fixed @ fixed.decoded_from_file)
        matrix = file_from_fixed @ a @ view_from_moving @ moving.decoded_from_file
        if not np.all(np.isfinite(matrix)):
            return Registration(None, 0.0, "network returned a non-finite matrix")
        return Registration(matrix[:2], confidence)

    def _attempt(self, coarse, fine, start, passes):
        """From ``start`` (coarse fixedview_from_movingview): ``passes`` of the network, then the
        fine stage. Returns (fine fixedview_from_movingview, confidence)."""
        fixed_view, moving_view = coarse
        a = start
        for _ in range(passes):
            warped = cv2.warpAffine(moving_view, a[:2], (self.size, self.size))
            a = self.predict(fixed_view[None], warped[None])[0] @ a
        ratio = scale_matrix(fine[0].shape[0] / self.size)
        return self._fine(*fine, ratio @ a @ np.linalg.inv(ratio))

    def _fine(self, fixed_view, moving_view, fixed_mask, moving_mask, a):
        """Refine ``a`` (fixedview_from_movingview) with patches where both fields of view
        overlap under the current estimate; returns it and its confidence (module docstring)."""
        side, p = fixed_view.shape[0], self.fine_patch
        estimate = self.predict if self.refine == "net" else self.phase
        agreement = None
        for _ in range(self.fine_iterations if side > p else 0):
            warped = cv2.warpAffine(moving_view, a[:2], (side, side))
            seen = cv2.warpAffine(moving_mask, a[:2], (side, side), flags=cv2.INTER_NEAREST)
            corners = _patch_corners(fixed_mask & seen, p, self.fine_patches)
            if len(corners) < 3:  # (almost) no overlap: nothing to measure, nothing to trust
                agreement = 0.0
                break
            fixed_patches = np.stack([fixed_view[y : y + p, x : x + p] for x, y in corners])
            moving_patches = np.stack([warped[y : y + p, x : x + p] for x, y in corners])
            local = estimate(fixed_patches, moving_patches)
            update, residual = _fit_patch_motions(local, corners, p, self.aggregate)
            a = update @ a
            agreement = float(np.mean(residual <= self.agree_px))
        if self.polish_iterations:
            a = _polish(fixed_view, fixed_mask, moving_view, a, self.polish_iterations)
        if agreement is not None:
            return a, agreement
        warped = cv2.warpAffine(moving_view, a[:2], (side, side))
        return a, _ncc(fixed_view, fixed_mask, warped)


def _patch_corners(mask, size, count):
    """Top-left corners (left, top) of up to ``count`` patches on a regular grid that lie inside
    the mask (all four corners and the centre of the patch in it)."""
    side = mask.shape[0]
    steps = max(2, int(np.ceil(np.sqrt(count))) + 1)
    candidates = np.linspace(0, side - size, steps + 1).round().astype(int)
    corners = []
    for top in candidates:
        for left in candidates:
            probe = [
                (top, left),
                (top, left + size - 1),
                (top + size - 1, left),
                (top + size - 1, left + size - 1),
                (top + size // 2, left + size // 2),
            ]
            if all(mask[y, x] for y, x in probe):
                corners.append((int(left), int(top)))
    order = np.argsort(
        [abs(x - side / 2 + size / 2) + abs(y - side / 2 + size / 2) for x, y in corners]
    )
    chosen = [corners[i] for i in order[::-1][:count]]  # prefer the outermost: best leverage
    return chosen


def _fit_patch_motions(local, corners, size, aggregate):
    """One residual affine (view pixels) from per-patch local matrices (patch pixels), and how far
    each patch's motion is from it (pixels, the worst of the patch's points).

    Each patch moves its own points by its local matrix, taken back to view pixels
    (``t_global = t_local + (l, t) - L (l, t)``): its centre alone when the local matrices are
    translations (phase correlation: one independent measurement per patch), else a 3x3 grid.
    One affine goes through those point pairs: ``trimmed`` by least squares, refitted without
    the points that the first fit leaves more than max(1.5 px, 2.5 x the median residual) away;
    ``lmeds`` by least median of squares; ``mean`` averages the patches' full-image matrices
    (the prototype's aggregate)."""
    translations_only = np.allclose(local[:, :2, :2], np.eye(2))
    ticks = [size / 2] if translations_only else [0, size / 2, size - 1]
    grid = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)  # (G, 2) in patch pixels
    origin = np.asarray(corners, np.float64)[:, None, :]  # (K, 1, 2): each patch's (left, top)
    moved = grid @ local[:, :2, :2].transpose(0, 2, 1) + local[:, None, :2, 2]  # (K, G, 2)
    src = (grid + origin).reshape(-1, 2).astype(np.float32)
    dst = (moved + origin).reshape(-1, 2).astype(np.float32)
    fit = None
    if aggregate == "lmeds" and len(corners) >= 3:
        fit, _ = cv2.estimateAffine2D(src, dst, method=cv2.LMEDS)
    if aggregate == "trimmed" and len(corners) >= 3:
        fit = _trimmed_fit(src, dst)
    if fit is None:  # the prototype's mean of the patches' full-image matrices
        fit = np.mean([global_from_local(m, x, y) for m, (x, y) in zip(local, corners)], axis=0)
    fit = to3x3(fit)
    miss = np.linalg.norm(src @ fit[:2, :2].T + fit[:2, 2] - dst, axis=1)
    return fit, miss.reshape(len(corners), -1).max(axis=1)


def _polish(fixed_view, fixed_mask, moving_view, a, iterations):
    """A few ECC (Gauss-Newton) steps on vessel edges from ``a``: the last sub-pixel; ``a`` is
    kept where ECC does not converge."""
    from classical import edges

    fixed_edges, fixed_mask = edges(fixed_view, fixed_mask)
    moving_edges, moving_mask = edges(moving_view, fov_mask(moving_view))
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, 1e-4)
    moving_from_fixed = np.linalg.inv(a)[:2].astype(np.float32)
    try:
        _, w = cv2.findTransformECCWithMask(
            fixed_edges,
            moving_edges,
            fixed_mask,
            moving_mask,
            moving_from_fixed,
            cv2.MOTION_AFFINE,
            criteria,
            5,
        )
    except cv2.error:
        return a
    polished = np.linalg.inv(to3x3(w))
    return polished if np.all(np.isfinite(polished)) else a


def _trimmed_fit(src, dst):
    """Least-squares affine, refitted once without the outlying points; None if degenerate."""
    try:
        fit, residual = fit_affine(src, dst)
        keep = residual <= max(1.5, 2.5 * np.median(residual))
        if 3 <= keep.sum() < len(src):
            fit, _ = fit_affine(src[keep], dst[keep])
    except ValueError:  # fewer than 3 points left, or all on one line
        return None
    return fit


def _ncc(fixed, mask, warped):
    """Normalised cross-correlation of fixed and warped moving inside the fixed FOV, in [0, 1]."""
    inside = (mask > 0) & (warped > 0)
    if inside.sum() < 100:
        return 0.0
    f = fixed[inside].astype(np.float64)
    w = warped[inside].astype(np.float64)
    f, w = f - f.mean(), w - w.mean()
    denom = np.sqrt((f * f).sum() * (w * w).sum())
    return float(max(0.0, (f * w).sum() / denom)) if denom > 0 else 0.0


# ----------------------------------------------------------------------------------------------


def main(args):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(args.THREADS)
    model = build_network(
        args.INPUT_SIZE,
        args.WIDTHS,
        args.HEAD_WIDTH,
        args.DROPOUT,
        args.CORRELATION_RADIUS,
        args.SIAMESE_STAGES,
    )
    print(f"parameters: {model.count_params():,}")
    spec = tf.TensorSpec((None, args.INPUT_SIZE, args.INPUT_SIZE, 2), tf.float32)
    predict = tf.function(lambda x: model(x, training=False)["matrix"], input_signature=[spec])
    x = (
        np.random.default_rng(0)
        .uniform(0, 255, (8, args.INPUT_SIZE, args.INPUT_SIZE, 2))
        .astype(np.float32)
    )
    for batch in (1, 8):
        predict(x[:batch])
        start = time.perf_counter()
        calls = max(1, args.TIME_PATCHES // batch)
        for _ in range(calls):
            predict(x[:batch])
        per_patch = (time.perf_counter() - start) / (calls * batch)
        print(
            f"CPU time per patch, batch {batch}, {args.THREADS} threads: {per_patch * 1000:.2f} ms"
        )


if __name__ == "__main__":
    exit_on_input_error(lambda: main(cli(globals(), __doc__)))
