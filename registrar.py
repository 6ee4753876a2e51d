"""registrar.py - how a trained network registers a pair of images (Network.py is the network).

``NetRegistrar.register(fixed, moving)`` returns a Registration whose ``fixed_from_moving`` is a
common.Transform in file pixels (an affine, or with TRANSFORM = quadratic the retina's 12-parameter
quadratic), coarse to fine:
    1. the network on both whole images (INPUT_SIZE px views), then on zoomed crops where both
       fields of view overlap (ZOOM_ITERATIONS): an affine, to within the patches' reach;
    2. patch passes at square views of FINE_SIZES px: FINE_PATCHES patches where both fields of
       view overlap, each one's shift by phase correlation, one transform fitted to them
       (weighted by the correlation peaks, trimmed); from the CONFIDENCE_SIZE pass on, the
       quadratic where its patches agree with it at least as well as with an affine;
    3. the confidence: the share of the CONFIDENCE_SIZE pass's patches that agree with the fit,
       capped where an affine misses the patches' own quadratic by more than MISFIT_PX;
    4. below RETRY_BELOW, retries from the identity and from 26 shifted and turned starts.
docs/procedure.md tells each step, why it is there and what it gained.

Frames (common.py's convention, 3x3 matrices named ``b_from_a``): file, image (decoded pixels),
level (an image halved k times), view (padded to a centred square, S x S: common.square_frame),
patch (a FINE_PATCH square at (left, top) of the fixed view). The estimate carried between passes
is ``fixed_from_moving`` in IMAGE pixels; each pass works in its own fixed view. Patches are cut
from the pyramid level nearest the pass's scale, one cv2.warpAffine each (for a quadratic, its
inverse's first-order expansion at the patch's centre: a 64 px patch bends by hundredths of a
pixel), so a pass costs the same on a 3000 px image as on a 768 px one.

Threads: callers should call ``Testing.set_threads(THREADS)`` first (one thread for NumPy's BLAS;
its second thread spins on the core that the network needs next).
"""

import functools

import cv2
import numpy as np

from common import (
    MODELS,
    Registration,
    Transform,
    apply_affine,
    as_transform,
    equalise,
    fit_transform,
    fov_mask,
    global_from_local,
    norm_from_pixels,
    rotation,
    scale_matrix,
    square_frame,
    square_view,
    to3x3,
    translation,
)
from Network import matrix_function

COARSE_ITERATIONS = 1
ZOOM = 2  # then the network on 1/ZOOM of views ZOOM times as large ...
ZOOM_ITERATIONS = 2  # ... this many times (0 = none)
FINE_SIZES = "192,384,768"  # one fine pass per entry: side of its square view ("" = coarse only)
FINE_PATCHES = 40
DENSE_BELOW = 0.5  # where fewer than this share of FINE_PATCHES fit, a denser grid (0 = never)
FINE_PATCH = 64  # side of the fine patches with REFINE = phase (with net: the network's input)
REFINE = "phase"  # fine stage: net (the network on patches) or phase (phase correlation)
AGGREGATE = "trimmed"  # how patch estimates combine: trimmed or lmeds (robust fits), mean
AGREE_PX = 3.0  # a patch agrees with the fitted affine within this many px (confidence)
CONFIDENCE_SIZE = 384  # the confidence is the agreement in the last pass at most this size
KEEP_FINER_ABOVE = 0.5  # a pass finer than that is kept only if this share of its patches agree
REPEAT_ABOVE = 0.125  # a pass up to CONFIDENCE_SIZE that moves a patch by more than this share of
# its side is repeated once (0 = never)
FLATTEN = True  # phase correlation of patches less their best-fitting plane (illumination)
WEIGHTED = True  # each patch weighs in the fit by the square of its phase-correlation peak
RETRY_BELOW = 0.5  # under this confidence, retry: the patches from the identity, then the
# network from 26 shifted and turned starts (until one is confident)
RETRY_SHIFT = 0.25  # 0 = no shifted starts
RETRY_ROTATION = 20.0  # degrees: then starts turned both ways, alone and shifted (0 = none)
RETRY_SIZE = 96  # a retry's fine passes begin with one at this view size (0 = none): twice the
# capture range of the first (192 px) pass
ZOOM_AT_OVERLAP = True  # the zoomed passes look at the overlap of both fields of view, not at the
# centre of the views
MASK_SIZE = 192  # side of the views in which the fields of view are found
JITTER = 0.0  # px: Gaussian noise of this size added to every translation the network predicts
# (pixels of its input; 0 = none), one stream from JITTER_SEED over a whole run (the same pairs in
# the same order get the same noise): how much a result owes to chance (README)
JITTER_SEED = 0
TRANSFORM = "affine"  # the model fitted to the patches: affine, or quadratic (the curved retina)
QUADRATIC_PATCHES = 12  # a pass fits the quadratic only with at least this many patches
MISFIT_PX = 25.0  # file px: an affine further than this from the patches' quadratic, on average,
# is not confident (FIRE's AUC counts nothing past 25 px)


class Pyramid:
    """One image and its halved copies, to cut views and patches from at any scale."""

    def __init__(self, pixels):
        self.shape = pixels.shape
        self.levels = [(pixels, np.eye(3))]  # (level pixels, level_from_image)
        while max(self.levels[-1][0].shape) >= 2 * MASK_SIZE:
            level, level_from_image = self.levels[-1]
            h, w = level.shape
            half = cv2.resize(level, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
            scale = scale_matrix(half.shape[1] / w, half.shape[0] / h)
            self.levels.append((half, scale @ level_from_image))

    def level(self, size):
        """(pixels, level_from_image) of the level nearest a square view of side ``size`` (a
        patch cut from a level twice as fine by bilinear sampling would alias)."""
        side = max(self.shape)
        ratios = [abs(np.log(max(level.shape) / min(size, side))) for level, _ in self.levels]
        return self.levels[int(np.argmin(ratios))]

    def view(self, size, equalise=True):
        """(square view uint8, view_from_image): common.square_view of the nearest larger level
        (cv2.resize's INTER_AREA does not alias)."""
        larger = [lv for lv in self.levels if max(lv[0].shape) >= size] or self.levels[:1]
        pixels, level_from_image = larger[-1]
        view, view_from_level = square_view(pixels, size, equalise)
        return view, view_from_level @ level_from_image

    def patches(self, image_from_patch, size):
        """Patches (K, size, size) uint8: patch k samples the image at ``image_from_patch[k]``,
        bilinearly from the level nearest its scale (a plain slice where the patch is a whole-
        pixel square of that level, as the fixed patches of a square image are)."""
        scale = np.sqrt(abs(np.linalg.det(image_from_patch[0][:2, :2])))
        pixels, level_from_image = self.level(max(self.shape) / scale)
        level_from_patch = level_from_image @ image_from_patch
        offsets, whole = level_from_patch[:, :2, 2], np.round(level_from_patch[:, :2, 2])
        h, w = pixels.shape
        if (  # np.allclose's tests, written out: it costs more than the slicing saves
            np.all(np.abs(level_from_patch[:, :2, :2] - np.eye(2)) <= 1e-9 + 1e-5 * np.eye(2))
            and np.all(np.abs(offsets - whole) <= 1e-6 + 1e-5 * np.abs(whole))
            and offsets.min() >= 0
            and offsets[:, 0].max() + size <= w
            and offsets[:, 1].max() + size <= h
        ):
            return np.stack([pixels[y : y + size, x : x + size] for x, y in whole.astype(int)])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        return np.stack(
            [cv2.warpAffine(pixels, m[:2], (size, size), flags=flags) for m in level_from_patch]
        )


class NetRegistrar:
    """Registers pairs with a trained network, coarse to fine (see the module docstring)."""

    def __init__(
        self,
        model,
        coarse_iterations=COARSE_ITERATIONS,
        zoom_iterations=ZOOM_ITERATIONS,
        fine_sizes=FINE_SIZES,
        fine_patches=FINE_PATCHES,
        dense_below=DENSE_BELOW,
        fine_patch=FINE_PATCH,
        aggregate=AGGREGATE,
        refine=REFINE,
        agree_px=AGREE_PX,
        retry_below=RETRY_BELOW,
        retry_shift=RETRY_SHIFT,
        retry_rotation=RETRY_ROTATION,
        keep_finer_above=KEEP_FINER_ABOVE,
        flatten=FLATTEN,
        weighted=WEIGHTED,
        repeat_above=REPEAT_ABOVE,
        zoom_at_overlap=ZOOM_AT_OVERLAP,
        jitter=JITTER,
        jitter_seed=JITTER_SEED,
        transform=TRANSFORM,
        quadratic_patches=QUADRATIC_PATCHES,
        misfit_px=MISFIT_PX,
        retry_size=RETRY_SIZE,
    ):
        if transform not in MODELS:
            raise ValueError(f"transform must be {' or '.join(MODELS)}, not {transform!r}")
        if aggregate not in ("lmeds", "trimmed", "mean"):
            raise ValueError(f"aggregate must be lmeds, trimmed or mean, not {aggregate!r}")
        if refine not in ("net", "phase"):
            raise ValueError(f"refine must be net or phase, not {refine!r}")
        self.model = model
        self.size = int(model.input_shape[1])
        self.coarse_iterations, self.zoom_iterations = coarse_iterations, zoom_iterations
        self.fine_sizes = [int(s) for s in str(fine_sizes).split(",") if s.strip() and int(s)]
        if retry_size and self.fine_sizes and retry_size >= self.fine_sizes[0]:
            raise ValueError(f"retry_size ({retry_size}) must be below the first fine size")
        self.fine_patches, self.dense_below = fine_patches, dense_below
        self.fine_patch = fine_patch if refine == "phase" else self.size  # the net: its input
        self.aggregate, self.refine = aggregate, refine
        self.agree_px, self.retry_below = agree_px, retry_below
        self.keep_finer_above, self.flatten, self.weighted = keep_finer_above, flatten, weighted
        self.repeat_above = repeat_above
        self.zoom_at_overlap = zoom_at_overlap
        self.jitter, self._jitter_rng = jitter, np.random.default_rng(jitter_seed)
        self.transform, self.quadratic_patches = transform, quadratic_patches
        self.misfit_px = misfit_px
        # starts for a low-confidence retry: the moving view shifted by retry_shift of its side
        # in 8 directions, then turned by +-retry_rotation about its centre, then both, which
        # puts a larger motion back within the network's training range
        step = retry_shift * self.size
        shifts = [
            translation(dx * step, dy * step)
            for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
            if step
        ]
        centre = (self.size - 1) / 2
        turns = [
            translation(centre, centre) @ rotation(degrees) @ translation(-centre, -centre)
            for degrees in ((retry_rotation, -retry_rotation) if retry_rotation else ())
        ]
        self._starts = shifts + turns + [shift @ turn for turn in turns for shift in shifts]
        # their network passes run in two batches: the shifts (most pairs that the retry saves
        # are saved by one), then the rest
        self._batches = [b for b in (self._starts[: len(shifts)], self._starts[len(shifts) :]) if b]
        # the fine passes up to the one whose agreement is the confidence (CONFIDENCE_SIZE), run
        # from every estimate tried, and the finer ones, run once, from the most confident
        judged = [s for s in self.fine_sizes if s <= CONFIDENCE_SIZE] or self.fine_sizes[-1:]
        self._judged = judged[-1] if judged else None
        cut = len(self.fine_sizes) - self.fine_sizes[::-1].index(self._judged) if judged else 0
        self._judging, self._finer = self.fine_sizes[:cut], self.fine_sizes[cut:]
        self._retry_sizes = [retry_size] * bool(retry_size) + self._judging
        self._predict = matrix_function(model)
        n = norm_from_pixels(self.size)
        self._norm_from_pixels, self._pixels_from_norm = n, np.linalg.inv(n)
        self.warm_up()

    def warm_up(self):
        """Run the whole procedure once on a made-up pair (traces the TensorFlow graph, starts
        OpenCV's threads), so that the clock of the first real pair measures registration."""
        from common import GreyImage

        disc = np.zeros((512, 512), np.uint8)
        cv2.circle(disc, (256, 256), 240, 255, -1)
        noise = np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)
        image = GreyImage(cv2.GaussianBlur(noise, (0, 0), 3) & disc, (512, 512), np.eye(3))
        self.register(image, image)
        for batch in self._batches:  # one interpreter per batch size: the retry's too
            blank = np.zeros((len(batch), self.size, self.size), np.uint8)
            self.predict(blank, blank)

    def predict(self, fixed_patches, moving_patches):
        """(K, P, P) uint8 pairs -> (K, 3, 3) ``fixedpatch_from_movingpatch`` in patch pixels (the
        network run by LiteRT: Network.matrix_function)."""
        x = np.stack([fixed_patches, moving_patches], axis=-1).astype(np.float32)
        norm = np.zeros((len(x), 3, 3))
        norm[:, :2], norm[:, 2, 2] = self._predict(x), 1.0
        local = self._pixels_from_norm @ norm @ self._norm_from_pixels
        if self.jitter:  # (JITTER) a measurement of chance, never the default
            local[:, :2, 2] += self._jitter_rng.normal(0.0, self.jitter, (len(local), 2))
        return local

    def phase(self, fixed_patches, moving_patches, flatten=False):
        """Closed-form alternative to ``predict`` for small residuals: each patch's translation by
        phase correlation (OpenCV, sub-pixel), as a (K, 3, 3) ``fixedpatch_from_movingpatch``,
        and the height of each correlation peak (K,), in [0, 1]: high where both patches show
        the same structure, low on a patch of plain background, where the shift is noise.
        With ``flatten``, each patch's best-fitting plane is subtracted first: an illumination
        gradient or haze across a patch (which the two visits do not share) would otherwise weigh
        as much in the whitened spectrum as the vessels, and pull the peak towards no shift."""
        local = np.tile(np.eye(3), (len(fixed_patches), 1, 1))
        peaks = np.zeros(len(fixed_patches))
        patches = np.concatenate([fixed_patches, moving_patches])  # uint8: one float copy below
        flat = _flatten(patches) if flatten else patches.astype(np.float32)
        fixed_patches, moving_patches = flat[: len(fixed_patches)], flat[len(fixed_patches) :]
        for k, (f, m) in enumerate(zip(fixed_patches, moving_patches)):
            (dx, dy), peaks[k] = cv2.phaseCorrelate(f, m, _hanning(f.shape[0]))
            local[k, :2, 2] = -dx, -dy  # m is f shifted by (dx, dy)
        return local, peaks

    def register(self, fixed, moving):
        """GreyImage pair -> Registration with ``fixed_from_moving`` in file pixels."""
        pyramids = Pyramid(fixed.pixels), Pyramid(moving.pixels)
        zoom = ZOOM * self.size
        coarse = (  # (view, view_from_image) of each image, whole and (when used) zoomed
            [p.view(self.size) for p in pyramids],
            [p.view(zoom, equalise=False) for p in pyramids] if self.zoom_iterations else [],
        )
        masks = []
        for p in pyramids:
            view, view_from_image = p.view(MASK_SIZE)
            masks.append((fov_mask(view) > 0, view_from_image))
        fine = (pyramids, masks)
        if not self.fine_sizes:  # the network alone; confidence: cross-correlation of the views
            a = self._network(coarse, masks, [np.eye(3)], self.coarse_iterations)[0]
            (fixed_view, fixed_from), (moving_view, moving_from) = coarse[0]
            v = fixed_from @ a @ np.linalg.inv(moving_from)
            warped = cv2.warpAffine(moving_view, v[:2], (self.size, self.size))
            confidence = _ncc(fixed_view, fov_mask(fixed_view), warped)
            t = Transform(a)
        else:  # from each estimate the passes up to CONFIDENCE_SIZE, until one is confident;
            # then the finer passes once, from the most confident (they leave its confidence be)
            t, confidence, stopped, curved = None, -1.0, False, None
            for k, estimate in enumerate(self._estimates(coarse, masks)):
                sizes = self._judging if k == 0 else self._retry_sizes
                tried = self._fine(fine, Transform(estimate), sizes)
                if tried[1] > confidence:
                    t, confidence, stopped, curved = tried
                if confidence >= self.retry_below:
                    break
            if not stopped and self._finer:
                t, _, _, bend = self._fine(fine, t, self._finer)
                curved = curved if bend is None else bend
            if curved is not None and curved is not t:  # a model that misses by MISFIT_PX
                misses = _misfit(masks, t, curved) / fixed.decoded_from_file[0, 0] / self.misfit_px
                confidence = confidence if misses <= 1 else min(confidence, 0.5 / misses)
        t = t.compose(np.linalg.inv(fixed.decoded_from_file), moving.decoded_from_file)
        if not np.all(np.isfinite(t.matrix)):
            return Registration(None, 0.0, "network returned a non-finite matrix")
        return Registration(t, confidence)

    def _estimates(self, coarse, masks):
        """The estimates (fixed_from_moving, image pixels) that the fine passes start from, in
        order: the network's from the identity; then, for a retry, the identity itself and the
        network's from each of the shifted and turned starts (module docstring, step 5), whose
        network passes run in two batches (26 inputs cost about 3/4 of 26 single calls)."""
        yield self._network(coarse, masks, [np.eye(3)], self.coarse_iterations)[0]
        if self.coarse_iterations:  # without the network there is nothing to retry
            yield self._network(coarse, masks, [np.eye(3)], 0)[0]
            for batch in self._batches:
                yield from self._network(coarse, masks, batch, self.coarse_iterations)

    def _network(self, coarse, masks, starts, passes):
        """From each start (coarse fixedview_from_movingview): ``passes`` of the network on the
        whole views, then (when it ran) the zoomed passes. Returns fixed_from_moving in image
        pixels for each start."""
        (fixed_view, fixed_from), (moving_view, moving_from) = coarse[0]
        a = np.asarray(starts, np.float64)
        fixed_views = np.repeat(fixed_view[None], len(a), axis=0)
        for _ in range(passes):
            warped = [cv2.warpAffine(moving_view, m[:2], (self.size, self.size)) for m in a]
            a = self.predict(fixed_views, np.stack(warped)) @ a
        a = np.linalg.inv(fixed_from) @ a @ moving_from  # image pixels from here on
        if passes and self.zoom_iterations:
            a = self._zoom(*coarse[1], masks, a)
        return list(a)

    def _fine(self, fine, t, sizes):
        """The fine passes of ``sizes`` (module docstring, step 3) from ``t`` (a Transform
        fixed_from_moving, image pixels). Returns (t, confidence: the agreement of the pass at
        the judged size, or 0 if it did not run, stopped: whether a finer pass was dropped and
        the passes stopped, and the latest quadratic that a pass fitted to its patches (the
        result itself where a pass took it), or None: MISFIT_PX)."""
        confidence, curved = 0.0, None
        for size in sizes:
            refined, agreement, moved, bend = self._fine_pass(*fine, t, size)
            if size <= self._judged and moved > self.repeat_above > 0:  # see REPEAT_ABOVE
                refined, agreement, _, bend = self._fine_pass(*fine, refined, size)
            curved = curved if bend is None else bend
            if size > self._judged and agreement < self.keep_finer_above:
                return t, confidence, True, curved  # too fine for this pair (blur, texture)
            t = refined
            if size == self._judged:
                confidence = agreement
        return t, confidence, False, curved

    def _zoom(self, fixed, moving, masks, estimates):
        """ZOOM_ITERATIONS network passes on crops of views ZOOM times as large as the coarse ones
        (the same network input size, so ZOOM times finer): each estimate's residual, ZOOM times
        more precisely, all estimates in one batch. Each crop is centred on the overlap of both
        fields of view under its estimate (ZOOM_AT_OVERLAP, as far as the view allows; at the
        view's centre otherwise) and equalised (CLAHE) on its own, as the network's inputs are
        in training. Takes and returns fixed_from_moving in image pixels, (K, 3, 3)."""
        (fixed_view, fixed_from), (moving_view, moving_from) = fixed, moving
        p = self.size
        crops, fixed_crops = [], []
        for a in estimates:
            left = top = (fixed_view.shape[0] - p) // 2
            centre = _overlap_centre(masks, a) if self.zoom_at_overlap else None
            if centre is not None:  # the crop centred on the overlap, inside the view
                x, y = (fixed_from @ [*centre, 1.0])[:2]
                left, top = (
                    int(np.clip(round(c - p / 2), 0, fixed_view.shape[0] - p)) for c in (x, y)
                )
            crops.append(translation(-left, -top))
            fixed_crops.append(equalise(fixed_view[top : top + p, left : left + p]))
        crops = np.asarray(crops)  # crop_from_view of each estimate
        v = fixed_from @ estimates @ np.linalg.inv(moving_from)  # fixedview_from_movingview
        for _ in range(self.zoom_iterations):
            warped = [equalise(cv2.warpAffine(moving_view, m[:2], (p, p))) for m in crops @ v]
            update = self.predict(np.stack(fixed_crops), np.stack(warped))
            v = np.linalg.inv(crops) @ update @ crops @ v
        return np.linalg.inv(fixed_from) @ v @ moving_from

    def _fine_pass(self, pyramids, masks, t, size):
        """One pass at a square view of side ``size``: refine ``t`` (a Transform
        fixed_from_moving, image pixels) with patches where both fields of view overlap; returns
        it, the share of patches that agree with it (the module docstring), how far the pass
        moved the farthest patch centre, in patch sides (REPEAT_ABOVE), and the quadratic through
        the same patches where one was fitted that they agree with, taken or not (None
        otherwise: MISFIT_PX)."""
        size = min(size, max(pyramids[0].shape))
        p = min(self.fine_patch, size // 2)
        view_from_image = square_frame(pyramids[0].shape, size)
        image_from_view = np.linalg.inv(view_from_image)
        corners = _patch_corners(
            masks, t, image_from_view, size, p, self.fine_patches, self.dense_below
        )
        if len(corners) < 3:  # (almost) no overlap at this scale: nothing to measure, nor trust
            return t, 0.0, 0.0, None
        image_from_patch = np.tile(image_from_view, (len(corners), 1, 1))  # @ translation(x, y)
        image_from_patch[:, :2, 2] += np.asarray(corners, np.float64) @ image_from_view[:2, :2].T
        if t.model == "affine":
            moving_from_patch = np.linalg.inv(to3x3(t.matrix)) @ image_from_patch
        else:  # the inverse's first-order expansion at each patch's centre (module docstring)
            centres = image_from_patch[:, :2] @ [p / 2, p / 2, 1.0]
            moving_from_patch = t.local_inverse(centres, tolerance=0.01) @ image_from_patch
        fixed_patches = pyramids[0].patches(image_from_patch, p)
        moving_patches = pyramids[1].patches(moving_from_patch, p)
        weights = None
        if self.refine == "net":
            local = self.predict(fixed_patches, moving_patches)
        else:
            local, peaks = self.phase(fixed_patches, moving_patches, self.flatten)
            if self.weighted:  # inverse variances: a shift's error falls as its peak rises
                weights = np.maximum(peaks, 1e-3) ** 2
        # an affine residual (view pixels), after the estimate
        fit, residual, moved = _fit_patch_motions(local, corners, p, self.aggregate, weights)
        agree = np.count_nonzero(residual <= self.agree_px)
        agreement = self._agreement(residual, len(corners), 3)
        refined = t.compose(left=image_from_view @ to3x3(fit.matrix) @ view_from_image)
        curved = None
        if size >= self._judged and len(corners) >= self.quadratic_patches:
            # the quadratic through the patches, from the moving image's points in a frame near
            # the view's (its scale): for the transform, or for the affine's misfit
            pre = view_from_image @ to3x3(t.matrix[:, :3])
            source = pre @ moving_from_patch
            fit, residual, shifts = _fit_patch_motions(
                local, corners, p, "trimmed", weights, source
            )
            fitted = 0.0 if fit is None else self._agreement(residual, len(corners), 6)
            if fitted >= self.retry_below:  # the patches agree with it (else it fits noise)
                curved = fit.compose(left=image_from_view, right=pre)
                if (
                    self.transform == "quadratic"
                    and np.count_nonzero(residual <= self.agree_px) >= agree
                ):
                    return curved, fitted, float(shifts.max() / p), curved  # (no misfit)
        return refined, agreement, float(moved.max() / p), curved

    def _agreement(self, residual, patches, free):
        """The share of patches whose motion lies within AGREE_PX of the fitted transform (view
        pixels), less the ``free`` ones that it goes through in any case (an affine 3, a
        quadratic 6), out of at least a quarter of FINE_PATCHES: a result that only a handful of
        patches support is not trusted (the module docstring)."""
        agree = np.count_nonzero(residual <= self.agree_px) - free
        return max(0, agree) / (max(patches, self.fine_patches / 4) - free)


def _misfit(masks, t, curved):
    """How far ``t`` is from ``curved`` (Transforms fixed_from_moving, image pixels), on average
    over where both fields of view see the retina under ``t``: the error that a model which
    cannot bend leaves where the retina does (image pixels)."""
    (_, fixed_from), _ = masks
    ys, xs = np.nonzero(_overlap(masks, t)[::2, ::2])  # every other mask pixel: plenty for a mean
    if len(xs) == 0:
        return 0.0
    points = apply_affine(np.linalg.inv(fixed_from), np.stack([xs, ys], 1) * 2.0)
    moving = t.inverse(points)
    return float(np.nanmean(np.linalg.norm(t(moving) - curved(moving), axis=1)))


def _overlap_centre(masks, a):
    """Centroid (fixed image pixels) of where both fields of view see the retina under ``a``
    (fixed_from_moving, image pixels); None without overlap."""
    (_, fixed_from), _ = masks
    ys, xs = np.nonzero(_overlap(masks, Transform(a), cv2.INTER_NEAREST))
    if len(xs) == 0:
        return None
    return (np.linalg.inv(fixed_from) @ [xs.mean(), ys.mean(), 1.0])[:2]


def _overlap(masks, t, interpolation=cv2.INTER_LINEAR):
    """The fixed mask's pixels (bool, its shape) where both fields of view see the retina under
    ``t`` (a Transform fixed_from_moving, image pixels): the moving mask laid over the fixed one."""
    (fixed_mask, fixed_from), (moving_mask, moving_from) = masks
    on_mask = t.compose(fixed_from, np.linalg.inv(moving_from))
    return fixed_mask & (
        on_mask.warp(moving_mask.astype(np.uint8), fixed_mask.shape, interpolation) > 0
    )


def _flatten(patches):
    """(K, P, P) patches as float32, each less its least-squares plane a x + b y + c (on a square
    grid the centred x, y and 1 are orthogonal: the plane is three projections, subtracted in
    one matrix product)."""
    k, p = patches.shape[:2]
    values = patches.reshape(k, -1).astype(np.float32)
    basis, projection = _plane_basis(p)
    values -= (values @ projection) @ basis
    return values.reshape(k, p, p)


@functools.cache
def _hanning(p):
    """The P x P window of phase correlation (patches are smaller than FINE_PATCH in a pass
    whose view is less than twice its side)."""
    return cv2.createHanningWindow((p, p), cv2.CV_32F)


@functools.cache
def _plane_basis(p):
    """(basis, projection): (3, P * P) float32, the centred x, y and 1 of a P x P patch, row by
    row, and (P * P, 3) the matrix that gives a patch's coefficients on them."""
    ramp = np.arange(p, dtype=np.float32) - (p - 1) / 2
    basis = np.stack([np.tile(ramp, p), np.repeat(ramp, p), np.ones(p * p, np.float32)])
    return basis, (basis / np.einsum("ij,ij->i", basis, basis)[:, None]).T


def _patch_corners(masks, t, image_from_view, size, patch, count, dense_below=DENSE_BELOW):
    """Top-left corners (left, top), in the fixed view of side ``size``, of up to ``count``
    patches on a regular grid whose four corners and centre lie in the fixed field of view and,
    under ``t`` (a Transform fixed_from_moving, image pixels), in the moving one; the outermost
    first.
    Where fewer than ``dense_below`` of ``count`` fit (a small overlap; a field of view that
    fills little of the square view, as a 1504 x 1000 image's does), the grid is made about
    twice as dense, its patches overlapping: a small overlap is measured by as many patches as a
    large one, and a right estimate gets as many patches to agree with it (the confidence's
    floor, module docstring). Returns a (K, 2) int array."""
    found = _corners_inside(masks, t, image_from_view, _patch_grid(size, patch, count), count)
    if len(found) < dense_below * count:
        dense = _patch_grid(size, patch, 4 * count)  # about twice as many per row and column
        denser = _corners_inside(masks, t, image_from_view, dense, count)
        found = denser if len(denser) > len(found) else found
    return found


def _corners_inside(masks, t, image_from_view, grid, count):
    """The ``count`` outermost of a _patch_grid's candidates inside both fields of view (the
    moving one's under ``t``, a Transform fixed_from_moving in image pixels)."""
    (fixed_mask, fixed_from), (moving_mask, moving_from) = masks
    corners, points, outward = grid
    fixed_from_view = fixed_from @ image_from_view
    inside = _in_mask(fixed_mask, points @ fixed_from_view[:2, :2].T + fixed_from_view[:2, 2])
    points = points[inside]  # only these need mapping into the moving image
    if t.model == "affine":  # one matrix from view to moving mask, as for the fixed one
        moving_from_view = moving_from @ np.linalg.inv(to3x3(t.matrix)) @ image_from_view
        moving_points = points @ moving_from_view[:2, :2].T + moving_from_view[:2, 2]
    else:  # the fixed image points mapped back by the transform's inverse
        image_points = points.reshape(-1, 2) @ image_from_view[:2, :2].T + image_from_view[:2, 2]
        moving = t.inverse(image_points, tolerance=0.01)  # a mask pixel is several image pixels
        moving_points = apply_affine(moving_from, moving).reshape(points.shape)
    inside[inside] = _in_mask(moving_mask, moving_points)
    return corners[inside][np.argsort(outward[inside])[::-1][:count]]  # best leverage first


def _in_mask(mask, points):
    """(N,) whether all of each candidate's (N, K, 2) points (mask pixels; NaN: nowhere) fall on
    the mask."""
    xy = np.rint(np.nan_to_num(points, nan=-1.0)).astype(int)
    x, y = xy[..., 0], xy[..., 1]
    h, w = mask.shape
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    ok[ok] = mask[y[ok], x[ok]]
    return ok.all(axis=1)


@functools.cache
def _patch_grid(size, patch, count):
    """The candidates of _patch_corners in a view of side ``size``: (N, 2) int top-left corners on
    a regular grid, (N, 5, 2) the points tested of each (its four corners and centre) and (N,)
    how far each lies from the view's centre (|dx| + |dy|)."""
    steps = max(2, int(np.ceil(np.sqrt(count))) + 1)
    ticks = np.linspace(0, size - patch, steps + 1).round()
    corners = np.stack([v.ravel() for v in np.meshgrid(ticks, ticks)], -1)
    probes = np.array([[0, 0], [patch - 1, 0], [0, patch - 1], [patch - 1] * 2, [patch / 2] * 2])
    outward = np.abs(corners - (size - patch) / 2).sum(axis=1)
    return corners.astype(int), corners[:, None, :] + probes[None], outward


def _fit_patch_motions(local, corners, size, aggregate, weights=None, source_from_patch=None):
    """One transform from per-patch local matrices (patch pixels); how far each patch's motion is
    from it and how far it moves each patch (view pixels, the worst of the patch's points).

    Each patch moves its own points by its local matrix, taken back to view pixels
    (``t_global = t_local + (l, t) - L (l, t)``): its centre alone when the local matrices are
    translations (phase correlation: one independent measurement per patch), else a 3x3 grid.
    Without ``source_from_patch`` one affine goes through those point pairs, the residual (view
    pixels) between where the points lie under the current estimate and where they belong:
    ``trimmed`` by least squares (weighted by ``weights``, one per patch, when given), refitted
    without the points that the first fit leaves more than max(1.5 px, 2.5 x the median
    residual) away; ``lmeds`` by least median of squares; ``mean`` averages the patches'
    full-image matrices (the prototype's aggregate). Only ``trimmed`` uses the weights.
    With ``source_from_patch`` (K, 3, 3: each patch's points in the frame of the moving image
    that the quadratic is fitted from), a quadratic from there to the view, ``trimmed``: a new
    estimate, not a residual (a quadratic after a quadratic is not one).
    Returns (the Transform, each patch's residual (K,), how far it moves each patch's centre
    (K,)), or three None where the points do not hold a quadratic."""
    origin = np.asarray(corners, np.float64)  # (K, 2): each patch's (left, top)
    if np.abs(local[:, :2, :2] - np.eye(2)).max() <= 1e-8:  # translations (np.allclose: slow)
        points = np.full((1, 2), size / 2)  # the centres
    else:  # a 3x3 grid of points in each patch
        ticks = [0, size / 2, size - 1]
        points = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)  # (G, 2), patch pixels
        weights = None if weights is None else np.repeat(weights, len(points))
    moved = points @ local[:, :2, :2].transpose(0, 2, 1) + local[:, None, :2, 2]  # (K, G, 2)
    src = (points + origin[:, None]).reshape(-1, 2).astype(np.float32)
    dst = (moved + origin[:, None]).reshape(-1, 2).astype(np.float32)
    fit = None
    if source_from_patch is not None:  # a quadratic from the moving image's points
        source = points @ source_from_patch[:, :2, :2].transpose(0, 2, 1)
        source = (source + source_from_patch[:, None, :2, 2]).reshape(-1, 2).astype(np.float32)
        fit = _trimmed_fit(source, dst, weights, "quadratic")
        if fit is None:  # degenerate: the patch field does not hold a quadratic
            return None, None, None
        src = source
    if aggregate == "lmeds" and len(corners) >= 3:
        fit, _ = cv2.estimateAffine2D(src, dst, method=cv2.LMEDS)
    if aggregate == "trimmed" and len(corners) >= 3 and fit is None:
        fit = _trimmed_fit(src, dst, weights)
    if fit is None:  # the prototype's mean of the patches' full-image matrices
        fit = np.mean([global_from_local(m, x, y) for m, (x, y) in zip(local, corners)], axis=0)
    fit = as_transform(fit)
    miss = np.linalg.norm(fit(src) - dst, axis=1).reshape(len(corners), -1).max(axis=1)
    centres = origin + size / 2
    if source_from_patch is None:
        shift = fit(centres) - centres
    else:
        shift = fit(source_from_patch[:, :2] @ [size / 2, size / 2, 1.0]) - centres
    return fit, miss, np.linalg.norm(shift, axis=1)


def _trimmed_fit(src, dst, weights=None, model="affine"):
    """(Weighted) least-squares transform of ``model``, refitted once without the outlying
    points; None if degenerate."""
    try:
        fit, residual = fit_transform(src, dst, model, weights)
        keep = residual <= max(1.5, 2.5 * np.median(residual))
        if len(src) > keep.sum() >= (3 if model == "affine" else 6):
            w = None if weights is None else weights[keep]
            fit, _ = fit_transform(src[keep], dst[keep], model, w)
    except ValueError:  # too few points left, or all on one line (one conic)
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
