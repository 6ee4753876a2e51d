"""registrar.py - how a trained network registers a pair of images (Network.py is the network).

``NetRegistrar.register(fixed, moving)`` returns ``fixed_from_moving`` in file pixels, coarse to
fine:
    1. coarse, the network: both whole images as COARSE views (padded square, INPUT_SIZE px,
       CLAHE; common.square_view); the network predicts the motion, the moving view is re-warped
       by the estimate and the network predicts the residual, COARSE_ITERATIONS times.
    2. zoomed, the network again: on 1/ZOOM of views ZOOM times as large (the same input size,
       so ZOOM times finer), ZOOM_ITERATIONS times: the residual, more precisely. The crop is
       centred where both fields of view overlap under the coarse estimate (ZOOM_AT_OVERLAP; at
       the views' centre otherwise): after a motion of a third of the side, the central crops
       share little retina.
    3. fine, one pass per entry of FINE_SIZES: at a square view of that side, FINE_PATCHES patches
       of FINE_PATCH px where both fields of view overlap (under the current estimate), on a
       regular grid, made about twice as dense where fewer than DENSE_BELOW of them fit (a small
       overlap, or a wide image's field of view in a square view), measure
       their residual translation by phase correlation (REFINE = phase: OpenCV, closed form,
       sub-pixel; each patch less its best-fitting plane first, FLATTEN) or by the network
       (REFINE = net); each is taken back to view pixels (the prototype's ``t_global`` formula)
       and ONE affine is fitted to them, robustly (AGGREGATE), each patch weighted by the square
       of its correlation peak (WEIGHTED: a patch of plain background measures noise, one that
       shows vessels in both images a shift; the weights are the inverse variances a least-
       squares fit wants, and they give vessels the weight that SIFT's keypoints and FIRE's
       control points, all on vessels, have). The passes go from coarse to fine:
       a small view first, where a patch reaches a residual twice as large (the capture range of
       the network's estimate), then larger ones for precision. A pass up to CONFIDENCE_SIZE
       that moves a patch by more than REPEAT_ABOVE of its side is repeated once from its own
       result: the correlation window weakens content shifted far, so a pass from a distant
       start measures short and stops part of the way. A pass larger than the image
       works at the image's own size. A pass finer than CONFIDENCE_SIZE is kept only if at least
       KEEP_FINER_ABOVE of its patches agree with its fit (on a blurred image, small patches at
       full resolution hold too little texture, and disagree).
    4. confidence: the share of patches whose motion agrees with the fitted affine within
       AGREE_PX px, in the pass at CONFIDENCE_SIZE (the last one at most that size), less the 3
       that any affine fits, and out of at least a quarter of FINE_PATCHES (a result that only
       a handful of patches support is not trusted; at 384 px a 40 % overlap holds 9 patches of
       the regular grid, 29 of the denser one). Right, the patches tell one story; wrong, they
       measure unrelated shifts and few agree. Not in a larger pass: there a 64 px patch covers
       too little of the retina, many see no vessel, measure no shift, and so agree with a wrong
       estimate as well as with a right one.
    5. retry: below RETRY_BELOW, registration is retried until a result is confident, keeping the
       most confident: first the fine stage from the identity (the network's guess can be wrong
       where the images differ most in appearance, and a small motion is within the patches'
       own reach), then the network from 8 starts shifted by RETRY_SHIFT of the side, 2 turned
       by +-RETRY_ROTATION, and the 16 combinations of both (real pairs moved by half their side
       can be out of the network's reach from the identity and from every shift alone). The
       network's passes from these starts run in two batches (the shifts, then the rest); the
       fine passes of each estimate run up to CONFIDENCE_SIZE only, and the finer ones
       (precision, not confidence) once, from the most confident.
       Without fine passes there is no retry, and the confidence is the normalised
       cross-correlation of the coarse views (blind to errors of a pixel or two at 64 px).

Frames (common.py's convention, 3x3 matrices named ``b_from_a``):
    file: pixels of the file; image: its decoded pixels (``GreyImage.pixels``); level: an image
    halved k times (cv2.resize, INTER_AREA); view: the image padded to a centred square and
    scaled to S x S (``common.square_frame``); patch: a FINE_PATCH square whose top-left pixel
    is (left, top) in the fixed view. The estimate carried between passes is
    ``fixed_from_moving`` in IMAGE pixels; each pass works in its own fixed view.

Patches are cut from the pyramid level nearest the pass's scale with cv2.warpAffine (a 64 px
output each), never by warping whole views: a pass costs the same on a 3000 px image as on a
768 px one, and no pixel is resampled twice.

Threads: Testing.py calls ``Testing.set_threads(THREADS)`` before it builds a NetRegistrar: THREADS
for OpenCV and TensorFlow, one for NumPy's BLAS (its products here are small, and a second
OpenBLAS thread spins on the core that the network needs next). Code that uses NetRegistrar on
its own should call it too: without it a network call took 2.0-2.2 ms between the other work
instead of 1.2-1.5 ms (README, speed).
"""

import functools

import cv2
import numpy as np

from common import (
    Registration,
    apply_affine,
    equalise,
    fit_affine,
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
ZOOM_AT_OVERLAP = True  # the zoomed passes look at the overlap of both fields of view, not at the
# centre of the views
MASK_SIZE = 192  # side of the views in which the fields of view are found
JITTER = 0.0  # px: Gaussian noise of this size added to every translation the network predicts
# (pixels of its input; 0 = none), one stream from JITTER_SEED over a whole run (the same pairs in
# the same order get the same noise): how much a result owes to chance (README)
JITTER_SEED = 0


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
    ):
        if aggregate not in ("lmeds", "trimmed", "mean"):
            raise ValueError(f"aggregate must be lmeds, trimmed or mean, not {aggregate!r}")
        if refine not in ("net", "phase"):
            raise ValueError(f"refine must be net or phase, not {refine!r}")
        self.model = model
        self.size = int(model.input_shape[1])
        self.coarse_iterations, self.zoom_iterations = coarse_iterations, zoom_iterations
        self.fine_sizes = [int(s) for s in str(fine_sizes).split(",") if s.strip() and int(s)]
        self.fine_patches, self.dense_below = fine_patches, dense_below
        self.fine_patch = fine_patch if refine == "phase" else self.size  # the net: its input
        self.aggregate, self.refine = aggregate, refine
        self.agree_px, self.retry_below = agree_px, retry_below
        self.keep_finer_above, self.flatten, self.weighted = keep_finer_above, flatten, weighted
        self.repeat_above = repeat_above
        self.zoom_at_overlap = zoom_at_overlap
        self.jitter, self._jitter_rng = jitter, np.random.default_rng(jitter_seed)
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
        else:  # from each estimate the passes up to CONFIDENCE_SIZE, until one is confident;
            # then the finer passes once, from the most confident (they leave its confidence be)
            a, confidence, stopped = None, -1.0, False
            for estimate in self._estimates(coarse, masks):
                refined, agreement, stop = self._fine(fine, estimate, self._judging)
                if agreement > confidence:
                    a, confidence, stopped = refined, agreement, stop
                if confidence >= self.retry_below:
                    break
            if not stopped:
                a, _, _ = self._fine(fine, a, self._finer)
        matrix = np.linalg.inv(fixed.decoded_from_file) @ a @ moving.decoded_from_file
        if not np.all(np.isfinite(matrix)):
            return Registration(None, 0.0, "network returned a non-finite matrix")
        return Registration(matrix[:2], confidence)

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

    def _fine(self, fine, a, sizes):
        """The fine passes of ``sizes`` (module docstring, step 3) from ``a`` (fixed_from_moving,
        image pixels). Returns (a, confidence: the agreement of the pass at the judged size, or 0
        if it did not run, stopped: whether a finer pass was dropped and the passes stopped)."""
        confidence = 0.0
        for size in sizes:
            refined, agreement, moved = self._fine_pass(*fine, a, size)
            if size <= self._judged and moved > self.repeat_above > 0:  # see REPEAT_ABOVE
                refined, agreement, _ = self._fine_pass(*fine, refined, size)
            if size > self._judged and agreement < self.keep_finer_above:
                return a, confidence, True  # too fine for this pair (blur, little texture)
            a = refined
            if size == self._judged:
                confidence = agreement
        return a, confidence, False

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

    def _fine_pass(self, pyramids, masks, a, size):
        """One pass at a square view of side ``size``: refine ``a`` (fixed_from_moving, image
        pixels) with patches where both fields of view overlap; returns it, the share of patches
        that agree with the refined affine (the module docstring), and how far the pass moved
        the farthest patch centre, in patch sides (REPEAT_ABOVE)."""
        size = min(size, max(pyramids[0].shape))
        p = min(self.fine_patch, size // 2)
        view_from_image = square_frame(pyramids[0].shape, size)
        image_from_view = np.linalg.inv(view_from_image)
        corners = _patch_corners(
            masks, a, image_from_view, size, p, self.fine_patches, self.dense_below
        )
        if len(corners) < 3:  # (almost) no overlap at this scale: nothing to measure, nor trust
            return a, 0.0, 0.0
        image_from_patch = np.tile(image_from_view, (len(corners), 1, 1))  # @ translation(x, y)
        image_from_patch[:, :2, 2] += np.asarray(corners, np.float64) @ image_from_view[:2, :2].T
        moving_from_patch = np.linalg.inv(a) @ image_from_patch
        fixed_patches = pyramids[0].patches(image_from_patch, p)
        moving_patches = pyramids[1].patches(moving_from_patch, p)
        weights = None
        if self.refine == "net":
            local = self.predict(fixed_patches, moving_patches)
        else:
            local, peaks = self.phase(fixed_patches, moving_patches, self.flatten)
            if self.weighted:  # inverse variances: a shift's error falls as its peak rises
                weights = np.maximum(peaks, 1e-3) ** 2
        update, residual = _fit_patch_motions(local, corners, p, self.aggregate, weights)
        a = image_from_view @ update @ view_from_image @ a
        # an affine goes through any 3 patches: those agree for free; and a result that only a
        # handful of patches support is not trusted (the module docstring)
        agree = np.count_nonzero(residual <= self.agree_px) - 3
        # how far the update moved the patches (the farthest centre), in patch sides
        centres = np.asarray(corners, np.float64) + p / 2
        moved = np.linalg.norm(centres @ (update[:2, :2] - np.eye(2)).T + update[:2, 2], axis=1)
        agreement = max(0, agree) / (max(len(corners), self.fine_patches / 4) - 3)
        return a, float(agreement), float(moved.max() / p)


def _overlap_centre(masks, a):
    """Centroid (fixed image pixels) of where both fields of view see the retina under ``a``
    (fixed_from_moving, image pixels); None without overlap."""
    (fixed_mask, fixed_from), (moving_mask, moving_from) = masks
    m = fixed_from @ a @ np.linalg.inv(moving_from)
    warped = cv2.warpAffine(moving_mask.astype(np.uint8), m[:2], fixed_mask.shape[::-1],
                            flags=cv2.INTER_NEAREST)  # fmt: skip
    ys, xs = np.nonzero(warped & fixed_mask)
    if len(xs) == 0:
        return None
    return (np.linalg.inv(fixed_from) @ [xs.mean(), ys.mean(), 1.0])[:2]


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


def _patch_corners(masks, a, image_from_view, size, patch, count, dense_below=DENSE_BELOW):
    """Top-left corners (left, top), in the fixed view of side ``size``, of up to ``count``
    patches on a regular grid whose four corners and centre lie in the fixed field of view and,
    under ``a`` (fixed_from_moving, image pixels), in the moving one; the outermost first.
    Where fewer than ``dense_below`` of ``count`` fit (a small overlap; a field of view that
    fills little of the square view, as a 1504 x 1000 image's does), the grid is made about
    twice as dense, its patches overlapping: a small overlap is measured by as many patches as a
    large one, and a right estimate gets as many patches to agree with it (the confidence's
    floor, module docstring). Returns a (K, 2) int array."""
    found = _corners_inside(masks, a, image_from_view, _patch_grid(size, patch, count), count)
    if len(found) < dense_below * count:
        dense = _patch_grid(size, patch, 4 * count)  # about twice as many per row and column
        denser = _corners_inside(masks, a, image_from_view, dense, count)
        found = denser if len(denser) > len(found) else found
    return found


def _corners_inside(masks, a, image_from_view, grid, count):
    """The ``count`` outermost of a _patch_grid's candidates inside both fields of view."""
    (fixed_mask, fixed_from), (moving_mask, moving_from) = masks
    corners, points, outward = grid
    inside = np.ones(len(corners), bool)
    for mask, mask_from_view in (
        (fixed_mask, fixed_from @ image_from_view),
        (moving_mask, moving_from @ np.linalg.inv(a) @ image_from_view),
    ):
        xy = np.rint(points @ mask_from_view[:2, :2].T + mask_from_view[:2, 2]).astype(int)
        x, y = xy[..., 0], xy[..., 1]
        h, w = mask.shape
        ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        ok[ok] = mask[y[ok], x[ok]]
        inside &= ok.all(axis=1)
    return corners[inside][np.argsort(outward[inside])[::-1][:count]]  # best leverage first


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


def _fit_patch_motions(local, corners, size, aggregate, weights=None):
    """One residual affine (view pixels) from per-patch local matrices (patch pixels), and how far
    each patch's motion is from it (pixels, the worst of the patch's points).

    Each patch moves its own points by its local matrix, taken back to view pixels
    (``t_global = t_local + (l, t) - L (l, t)``): its centre alone when the local matrices are
    translations (phase correlation: one independent measurement per patch), else a 3x3 grid.
    One affine goes through those point pairs: ``trimmed`` by least squares (weighted by
    ``weights``, one per patch, when given), refitted without the points that the first fit
    leaves more than max(1.5 px, 2.5 x the median residual) away; ``lmeds`` by least median of
    squares; ``mean`` averages the patches' full-image matrices (the prototype's aggregate).
    Only ``trimmed`` uses the weights."""
    origin = np.asarray(corners, np.float64)  # (K, 2): each patch's (left, top)
    if np.abs(local[:, :2, :2] - np.eye(2)).max() <= 1e-8:  # translations (np.allclose: slow)
        src = (origin + size / 2).astype(np.float32)  # the centres
        dst = (size / 2 + local[:, :2, 2] + origin).astype(np.float32)
    else:  # a 3x3 grid of points in each patch
        ticks = [0, size / 2, size - 1]
        grid = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)  # (G, 2) in patch pixels
        moved = grid @ local[:, :2, :2].transpose(0, 2, 1) + local[:, None, :2, 2]  # (K, G, 2)
        src = (grid + origin[:, None]).reshape(-1, 2).astype(np.float32)
        dst = (moved + origin[:, None]).reshape(-1, 2).astype(np.float32)
        weights = None if weights is None else np.repeat(weights, len(grid))
    fit = None
    if aggregate == "lmeds" and len(corners) >= 3:
        fit, _ = cv2.estimateAffine2D(src, dst, method=cv2.LMEDS)
    if aggregate == "trimmed" and len(corners) >= 3:
        fit = _trimmed_fit(src, dst, weights)
    if fit is None:  # the prototype's mean of the patches' full-image matrices
        fit = np.mean([global_from_local(m, x, y) for m, (x, y) in zip(local, corners)], axis=0)
    fit = to3x3(fit)
    miss = np.linalg.norm(apply_affine(fit, src) - dst, axis=1)
    return fit, miss.reshape(len(corners), -1).max(axis=1)


def _trimmed_fit(src, dst, weights=None):
    """(Weighted) least-squares affine, refitted once without the outlying points; None if
    degenerate."""
    try:
        fit, residual = fit_affine(src, dst, weights)
        keep = residual <= max(1.5, 2.5 * np.median(residual))
        if 3 <= keep.sum() < len(src):
            fit, _ = fit_affine(src[keep], dst[keep], None if weights is None else weights[keep])
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
