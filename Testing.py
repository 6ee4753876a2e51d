"""Testing.py - step 4 of 4: register pairs and measure them by the FIRE protocol.

    python Testing.py --data DIR --method net,sift,orb,ecc --out OUT   # a FIRE-layout folder
    python Testing.py --fixed F.jpg --moving M.jpg --out OUT           # any one pair
    ... --transform quadratic     # every method fits the curved retina's quadratic, not an affine

METHOD: ``net`` (the model MODEL), a ``.keras`` model's path, or ``sift``, ``orb``, ``ecc``
(classical.py). Every method gets the same clock (from both images decoded to the transform, models
loaded and warmed up before) and the same threads; several run pair by pair in turn.
A folder gives OUT/per_pair.csv (each pair's error, time, transform and confidence; rows kept on
a rerun made with the same settings.json), summary.json (FIRE's AUC per category and their mean,
median error, failed, inaccurate, bad, low-confidence counts, median and p90 seconds),
success_rate.png, confidence.png and figures/<pair>.png; with several methods one folder each and
OUT/comparison.md. One pair gives OUT/result.json, warped.png, overlay.png and checkerboard.png.
README.md says what each file holds; the error is FIRE's (the mean distance of the fixed control
points to the moving ones mapped, in file pixels).
"""

import csv
import functools
import hashlib
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from common import (
    AUC_MAX_PX,
    MODELS,
    InputError,
    Transform,
    apply_affine,
    as_transform,
    cli,
    equalise,
    exit_on_input_error,
    fire_error,
    import_tensorflow,
    is_inaccurate,
    read_fire,
    read_image,
    success_auc,
    write_atomic,
    write_json,
)

DATA = "data/sample"  # FIRE-layout folder (ignored when FIXED and MOVING are given)
FIXED = ""
MOVING = ""
METHOD = "net"  # comma-separated: net, a .keras path, sift, orb, ecc
TRANSFORM = "affine"  # the model every method fits: affine, or quadratic (common.Transform)
MODEL = "models/fundusreg.keras"
OUT = "results/sample"
THREADS = 2
FIGURES = True  # per-pair figures (fixed / moving / warped / overlay / checkerboard)
RESUME = True  # keep finished rows of an existing per_pair.csv
COARSE_ITERATIONS = 1  # net: the registration procedure's settings (registrar.py)
ZOOM_ITERATIONS = 2
FINE_SIZES = "192,384,768"
FINE_PATCHES = 40
DENSE_BELOW = 0.5  # net: where fewer than this share of FINE_PATCHES fit, a denser grid (0 = never)
FINE_PATCH = 64
REFINE = "phase"  # fine stage: net (the network on patches) or phase (phase correlation)
AGGREGATE = "trimmed"  # how patch estimates combine: trimmed or lmeds (robust fits), mean
AGREE_PX = 3.0  # net confidence: share of fine patches within this many px of the fitted affine
RETRY_BELOW = 0.5  # net: below this confidence, retry (patches from the identity, other starts)
RETRY_SHIFT = 0.25  # net: the shifted starts move the moving image by this share of its side
RETRY_ROTATION = 20.0  # net: then starts turned by this many degrees both ways, alone and shifted
RETRY_SIZE = 96  # net: a retry's patch passes begin with one at this view size (0 = none)
KEEP_FINER_ABOVE = 0.5  # net: a pass finer than 384 px is kept only if this share of patches agree
FLATTEN = True  # net: patches less their best-fitting plane before phase correlation
WEIGHTED = True  # net: patches weigh in the fit by the square of their correlation peak
REPEAT_ABOVE = 0.125  # net: a pass that moves a patch more than this share of it is repeated once
ZOOM_AT_OVERLAP = True  # net: the zoomed passes look where both fields of view overlap
JITTER = 0.0  # net: px of noise added to each network translation (measures chance; 0 = none)
JITTER_SEED = 0
QUADRATIC_PATCHES = 12  # net: a pass fits the quadratic only with at least this many patches
MISFIT_PX = 25.0  # net: an affine this far from the patches' quadratic (file px) is doubted
SIFT_SIDE = 512  # sift: the working size (longest side, px) and the keypoints kept (classical.py)
SIFT_FEATURES = 2000
ORB_SIDE = 384  # orb: the same, and the levels of its pyramid
ORB_FEATURES = 1000
ORB_LEVELS = 4
ECC_SIDE = 384  # ecc: the finest level's longest side, px
NET_SETTINGS = (  # the constants above that NetRegistrar takes, each as its lower-case keyword
    "COARSE_ITERATIONS",
    "ZOOM_ITERATIONS",
    "FINE_SIZES",
    "FINE_PATCHES",
    "DENSE_BELOW",
    "FINE_PATCH",
    "REFINE",
    "AGGREGATE",
    "AGREE_PX",
    "RETRY_BELOW",
    "RETRY_SHIFT",
    "RETRY_ROTATION",
    "RETRY_SIZE",
    "KEEP_FINER_ABOVE",
    "FLATTEN",
    "WEIGHTED",
    "REPEAT_ABOVE",
    "ZOOM_AT_OVERLAP",
    "JITTER",
    "JITTER_SEED",
    "TRANSFORM",
    "QUADRATIC_PATCHES",
    "MISFIT_PX",
)
LOW_CONFIDENCE = 0.5  # a registration below this confidence is counted as low_confidence
BAD_PX = 25.0  # a registration with a larger FIRE error (or failed, or inaccurate) is bad

MATRIX = [f"m{i}{j}" for i in range(2) for j in range(6)]  # a Transform's 2x6 (2x3: affine)
COLUMNS = ["pair", "category", "error_px", "seconds", "transform", *MATRIX]
COLUMNS += ["confidence", "inaccurate", "reason"]
CLASSICAL = ("sift", "orb", "ecc")
CLASSICAL_SETTINGS = {  # the constants above that each classical method takes: ORB_SIDE -> side
    "sift": ("SIFT_SIDE", "SIFT_FEATURES", "TRANSFORM"),
    "orb": ("ORB_SIDE", "ORB_FEATURES", "ORB_LEVELS", "TRANSFORM"),
    "ecc": ("ECC_SIDE", "TRANSFORM"),
}


def set_threads(threads, tensorflow=True):
    """THREADS for OpenCV and TensorFlow (LiteRT takes TensorFlow's), for every method alike; and
    one for NumPy's BLAS (OpenBLAS): its products here are small (a pass's patches flattened, the
    affine fits), a second thread gains nothing on them, and once woken it spins on a core for a
    while after each, the core that LiteRT and OpenCV need next. On fire-dev-hard the net's median
    was 21.6-31.1 ms with one BLAS thread and 29.4-34.0 ms with two, six runs of each in turn,
    the same matrices (README, speed)."""
    cv2.setNumThreads(threads)
    threadpool_limits(1, user_api="blas")
    if not tensorflow:  # classical methods only: no need to import TensorFlow (seconds)
        return
    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def make_method(name, args):
    """name -> (label, function(fixed GreyImage, moving GreyImage) -> Registration)."""
    if name in CLASSICAL:
        from classical import METHODS

        return name, functools.partial(METHODS[name], **method_settings(name, args))
    if name == "net" or name.endswith(".keras"):
        from Network import load_network
        from registrar import NetRegistrar

        path = args.MODEL if name == "net" else name
        model = load_network(path)
        settings = {name.lower(): getattr(args, name) for name in NET_SETTINGS}
        try:
            registrar = NetRegistrar(model, **settings)
        except ValueError as e:  # a setting the procedure cannot take: one line, like a bad file
            raise InputError("net settings", str(e)) from None
        return ("net" if name == "net" else Path(name).stem), registrar.register
    raise InputError(name, "unknown method (use net, a .keras model path, sift, orb or ecc)")


def timed(register, fixed, moving):
    start = time.perf_counter()
    result = register(fixed, moving)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Figures (files, never windows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(fixed, warped):
    """Colour overlay: fixed in magenta, warped moving in green (grey where they agree)."""
    return np.dstack([fixed, warped, fixed])


def warp_to_fixed(fixed, moving, fixed_from_moving):
    """The moving image laid over the fixed one, both as decoded (GreyImage) pixels
    (``fixed_from_moving``: a Transform in file pixels)."""
    decoded = as_transform(fixed_from_moving).compose(
        fixed.decoded_from_file, np.linalg.inv(moving.decoded_from_file)
    )
    return decoded.warp(moving.pixels, fixed.pixels.shape)


def checkerboard(fixed, warped, tiles=8):
    """Checkerboard mosaic of two grey uint8 images of the same shape (H, W): square tiles of side
    round(max(H, W) / tiles) px, taken from ``fixed`` where (tile row + tile column) is even, so
    the top-left tile is fixed, and from ``warped`` (the moving image laid over the fixed one,
    ``warp_to_fixed``) where it is odd. Aligned, vessels run on unbroken across tile edges;
    misaligned, they step or break there."""
    if fixed.shape != warped.shape or fixed.ndim != 2:
        raise ValueError(f"need two grey images of one shape, got {fixed.shape} and {warped.shape}")
    h, w = fixed.shape
    side = max(1, round(max(h, w) / tiles))
    odd = (np.arange(h)[:, None] // side + np.arange(w)[None, :] // side) % 2 == 1
    return np.where(odd, warped, fixed)


def zoom_box(fixed, warped, tiles=8):
    """(top, left, side) of a square two checkerboard tiles wide, centred on the tile corner whose
    two edges cross the most vessel (black-hat of ``fixed``, where both images have content):
    where a misalignment shows, at a size a figure panel can show at full resolution or more."""
    h, w = fixed.shape
    tile = max(1, round(max(h, w) / tiles))
    k = 2 * max(1, round(max(h, w) / 100)) + 1  # a little wider than the widest vessels
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    both = cv2.erode(((fixed > 10) & (warped > 10)).astype(np.uint8), kernel)
    vessels = (cv2.morphologyEx(fixed, cv2.MORPH_BLACKHAT, kernel) * both).astype(np.int64)
    best, top, left = -1, 0, 0
    for y in range(tile, h - tile + 1, tile):
        for x in range(tile, w - tile + 1, tile):
            cross = vessels[y - tile : y + tile, x - 1 : x + 1].sum()
            cross += vessels[y - 1 : y + 1, x - tile : x + tile].sum()
            if cross > best:
                best, top, left = cross, y - tile, x - tile
    return top, left, min(2 * tile, h, w)


def pair_figure(path, fixed, moving, result, points=None, title=""):
    """Six panels in two rows: fixed, moving, moving warped onto fixed; the colour overlay (with
    the control points when given), the checkerboard of fixed and warped (both equalised by CLAHE,
    so that vessels stand out and the tiles differ in geometry rather than exposure) and a zoom
    into it (the yellow box). Returns the panel titles in order."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 10.6), layout="constrained")
    axes = axes.ravel()
    names = ["fixed", "moving", "moving warped onto fixed", "overlay: fixed magenta, warped green"]
    names += ["checkerboard: fixed and warped tiles", "checkerboard zoom (yellow box)"]
    for axis, name in zip(axes, names):
        axis.set_title(name)
        axis.axis("off")
    axes[0].imshow(fixed.pixels, cmap="gray")
    axes[1].imshow(moving.pixels, cmap="gray")
    if result.fixed_from_moving is not None:
        warped = warp_to_fixed(fixed, moving, result.fixed_from_moving)
        axes[2].imshow(warped, cmap="gray")
        axes[3].imshow(overlay(fixed.pixels, warped))
        board = checkerboard(equalise(fixed.pixels), equalise(warped))
        top, left, side = zoom_box(fixed.pixels, warped)
        axes[4].imshow(board, cmap="gray", vmin=0, vmax=255)
        axes[4].add_patch(plt.Rectangle((left, top), side, side, fill=False, ec="yellow", lw=2))
        zoom = board[top : top + side, left : left + side]
        axes[5].imshow(zoom, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if points is not None:
            scale = fixed.decoded_from_file
            ref = apply_affine(scale, points[:, :2])
            mapped = apply_affine(scale, result.fixed_from_moving(points[:, 2:]))
            axes[3].plot(ref[:, 0], ref[:, 1], "o", mfc="none", mec="yellow", label="fixed points")
            axes[3].plot(
                mapped[:, 0], mapped[:, 1], "+", color="cyan", label="moving points mapped"
            )
            axes[3].legend(loc="lower right", fontsize=7)
            h, w = fixed.pixels.shape  # points mapped off the image must not rescale the panel
            axes[3].set_xlim(-0.5, w - 0.5)
            axes[3].set_ylim(h - 0.5, -0.5)
    fig.suptitle(title)
    save(fig, path)
    return names


def misalignment_figure(result_json, path="docs/checkerboard.png", shift_px=3.0):
    """What a misalignment looks like: the checkerboard zoom (``zoom_box``) of a pair registered by
    the single-pair command (its ``result.json``) beside the same with the moving image moved
    ``shift_px`` further down (fixed-file pixels; the large vessels of a fundus run mostly across
    the vertical tile edges, where a vertical step shows). The README's figure:

        python -c "import Testing; Testing.misalignment_figure('results/one/result.json')"
    """
    from common import translation

    result = json.loads(Path(result_json).read_text())
    fixed, moving = read_image(result["fixed"]), read_image(result["moving"])
    registered = Transform(result["fixed_from_moving"])
    moved = registered.compose(left=translation(0, shift_px))
    top, left, side = zoom_box(fixed.pixels, warp_to_fixed(fixed, moving, registered))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(15, 8), layout="constrained")
    names = ["as registered", f"moved {shift_px:g} px further down"]
    for axis, m, name in zip(axes, (registered, moved), names):
        board = checkerboard(equalise(fixed.pixels), equalise(warp_to_fixed(fixed, moving, m)))
        zoom = board[top : top + side, left : left + side]
        axis.imshow(zoom, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axis.set_title(name)
        axis.axis("off")
    fig.suptitle(
        f"Checkerboard of {Path(result['fixed']).name} and {Path(result['moving']).name}: "
        f"a {side} px square, tiles of {side // 2} px"
    )
    save(fig, path)


def save(fig, path):
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def success_figure(path, errors_by_method):
    """Success rate (share of pairs with error <= t) against t, one curve per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    t = np.linspace(0, AUC_MAX_PX, 251)
    for name, errors in errors_by_method.items():
        errors = np.asarray(errors, np.float64)
        ax.plot(
            t, [(errors <= v).mean() for v in t], label=f"{name} (AUC {success_auc(errors):.3f})"
        )
    ax.set_xlabel("threshold (px)")
    ax.set_ylabel("share of pairs registered within the threshold")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, path)


def confidence_figure(path, rows, summary, low_confidence, bad_px):
    """Confidence against FIRE error, with the two thresholds: a useful confidence leaves the
    upper right (confident but bad) and the lower left (good but doubted) empty. Failed pairs
    are drawn at the top."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    errors = [float(r["error_px"]) for r in rows if r["error_px"]]
    ceiling = max([bad_px * 4, *errors])
    for category, marker in zip("SPA", "os^"):
        picked = [r for r in rows if r["category"] == category and r["confidence"]]
        ax.scatter(
            [float(r["confidence"]) for r in picked],
            [float(r["error_px"]) if r["error_px"] else ceiling for r in picked],
            marker=marker,
            label=category,
            alpha=0.7,
        )
    ax.axvline(low_confidence, color="grey", linestyle="--", linewidth=1)
    ax.axhline(bad_px, color="grey", linestyle=":", linewidth=1)
    if errors and max(errors) > 0:  # log of nothing fails
        ax.set_yscale("log")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"confidence (dashed: {low_confidence})")
    ax.set_ylabel(f"FIRE error (px; dotted: {bad_px:g})")
    ax.set_title(
        f"{summary['method']}: {summary['bad']} bad, {summary['low_confidence']} low confidence, "
        f"{summary['bad_and_low_confidence']} both",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


# ----------------------------------------------------------------------------------------------
# A FIRE-layout folder


def read_json(path):
    """A JSON file's content, or None where it is missing or unreadable (a torn write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_rows(path):
    """Complete rows of an existing per_pair.csv (a torn last line is dropped)."""
    if not Path(path).exists():
        return {}
    with open(path, newline="") as f:
        return {r["pair"]: r for r in csv.DictReader(f) if r.get("reason") is not None}


def read_pair(item):
    """(fixed, moving) GreyImages of a FIRE pair, or the one line that says why it cannot be
    read."""
    try:
        if item.problem:
            raise InputError(item.pair, item.problem)
        return read_image(item.fixed), read_image(item.moving)
    except InputError as e:
        return str(e)


def evaluate_pair(item, images, register, out, figures):
    """One FIRE pair and its read_pair -> a per_pair.csv row (dict); failures become rows with a
    reason."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(pair=item.pair, category=item.category)
    if isinstance(images, str):
        row["reason"] = images
        return row
    fixed, moving = images
    try:
        result, seconds = timed(register, fixed, moving)
    except Exception as e:  # a batch records the pair as failed and goes on
        row["reason"] = f"registration crashed: {type(e).__name__}: {str(e).strip()[:200]}"
        return row
    row.update(seconds=f"{seconds:.4f}", confidence=f"{result.confidence:.4f}")
    if result.fixed_from_moving is None:
        row["reason"] = result.reason or "registration failed"
    else:
        m = result.fixed_from_moving
        row["transform"] = m.model
        for (i, j), v in np.ndenumerate(m.matrix):  # the affine columns, then the quadratic's
            row[f"m{i}{j}"] = f"{v:.6f}" if j < 3 else f"{v:.6e}"
        row["error_px"] = f"{fire_error(m, item.points):.4f}"
        row["inaccurate"] = str(is_inaccurate(m, item.points))
    if figures:
        title = f"{item.pair}: error {row['error_px'] or 'failed'} px"
        pair_figure(out / "figures" / f"{item.pair}.png", fixed, moving, result, item.points, title)
    return row


def is_bad(row, bad_px=BAD_PX):
    """No matrix, FIRE-inaccurate, or an error past bad_px (where it adds nothing to the AUC)."""
    return not row["error_px"] or row["inaccurate"] == "True" or float(row["error_px"]) > bad_px


def is_low(row, low_confidence=LOW_CONFIDENCE):
    return not row["confidence"] or float(row["confidence"]) < low_confidence


def summarise(rows, threads, low_confidence=LOW_CONFIDENCE, bad_px=BAD_PX):
    errors = {r["pair"]: float(r["error_px"]) if r["error_px"] else math.inf for r in rows}
    auc = {}
    for category in "SPA":
        picked = [errors[r["pair"]] for r in rows if r["category"] == category]
        auc[f"AUC_{category}"] = success_auc(picked) if picked else None
    present = [v for v in auc.values() if v is not None]
    seconds = [float(r["seconds"]) for r in rows if r["seconds"]]
    all_errors = list(errors.values())
    return {
        "n_pairs": len(rows),
        "mAUC": float(np.mean(present)) if present else None,
        **auc,
        "median_error_px": float(np.median(all_errors)) if all_errors else None,
        "failed": sum(1 for r in rows if not r["error_px"]),
        "inaccurate": sum(1 for r in rows if r["inaccurate"] == "True"),
        "bad": sum(1 for r in rows if is_bad(r, bad_px)),
        "low_confidence": sum(1 for r in rows if is_low(r, low_confidence)),
        "bad_and_low_confidence": sum(
            1 for r in rows if is_bad(r, bad_px) and is_low(r, low_confidence)
        ),
        "median_seconds": float(np.median(seconds)) if seconds else None,
        "p90_seconds": float(np.percentile(seconds, 90)) if seconds else None,
        "threads": threads,
    }


def method_settings(name, args):
    """A classical method's keyword arguments from its CLASSICAL_SETTINGS: ORB_SIDE -> side,
    TRANSFORM -> transform."""
    return {key.split("_", 1)[-1].lower(): getattr(args, key) for key in CLASSICAL_SETTINGS[name]}


def run_settings(name, args):
    """What a method's per_pair.csv rows depend on: the data folder, the method, the threads (the
    times), the code that runs it (its source files, by content), for the network its model file
    (by content) and the procedure's settings, for a classical method its settings. Kept beside
    the rows (settings.json) so that RESUME keeps only rows made the same way."""
    settings = {"data": str(Path(args.DATA).resolve()), "method": name, "threads": args.THREADS}
    sources = ["Testing.py", "common.py"]
    sources += ["classical.py"] if name in CLASSICAL else ["registrar.py", "Network.py"]
    code = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in sources))
    settings["code_sha256"] = code.hexdigest()
    keys = CLASSICAL_SETTINGS.get(name, NET_SETTINGS)
    if name not in CLASSICAL:
        model = Path(args.MODEL if name == "net" else name)
        settings["model_sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    settings.update({key.lower(): getattr(args, key) for key in keys})
    return settings


def open_folder(pairs, label, out, args, settings):
    """Start one method's per_pair.csv in ``out``. With RESUME, the rows already there of
    ``pairs`` are kept if ``settings`` (run_settings) are those they were made with, and redone
    otherwise (other settings, a rerun after a change of flags); rows of pairs no longer in the
    folder are dropped. Returns (the kept rows by pair, in the order of ``pairs``, the file, its
    csv writer)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    csv_path, settings_path = out / "per_pair.csv", out / "settings.json"
    done = read_rows(csv_path) if args.RESUME else {}
    if done and (read_json(settings_path) or {}) != json.loads(json.dumps(settings)):
        tqdm.write(f"{label}: the {len(done)} rows in {csv_path} were made with other settings "
                   "(settings.json), so they are redone")  # fmt: skip
        done = {}
    done = {p.pair: done[p.pair] for p in pairs if p.pair in done}
    write_json(settings_path, settings)
    f = open(csv_path, "w", newline="")  # the kept rows rewritten, then appended as they come
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    writer.writerows(done.values())
    f.flush()
    return done, f, writer


def close_folder(label, out, rows, args):
    """summary.json and the two figures of one method's rows."""
    rows = sorted(rows, key=lambda r: r["pair"])
    summary = {"method": label, **summarise(rows, args.THREADS, args.LOW_CONFIDENCE, args.BAD_PX)}
    write_json(out / "summary.json", summary)
    errors = [float(r["error_px"]) if r["error_px"] else math.inf for r in rows]
    success_figure(out / "success_rate.png", {label: errors})
    confidence_figure(out / "confidence.png", rows, summary, args.LOW_CONFIDENCE, args.BAD_PX)
    return summary, errors


def evaluate_folder(pairs, methods, args):
    """Run the methods ``[(label, register, out folder, settings)]`` over the pairs, pair by pair:
    each pair's images are read once, and the methods register it in turn, the order rotated from
    pair to pair (each goes first on as many pairs, so none always runs after the same other).
    Rows are written as they come (RESUME: rows kept are not redone). In one method's own loop
    after another's, a busy moment of this shared machine fell on one method only: on
    fire-dev-hard the net's median was 1.00-1.51x ORB's over six such runs, 1.03-1.16x in turn
    (README, speed). Returns [(summary, errors)] in the order of ``methods``."""
    from contextlib import ExitStack

    from tqdm import tqdm

    with ExitStack() as stack:
        # runs: per method (label, register, out, kept rows, file, writer); rows: by label, the
        # kept rows and then the new ones, for close_folder
        runs, rows = [], {}
        for label, register, out, settings in methods:
            done, f, writer = open_folder(pairs, label, out, args, settings)
            stack.callback(f.close)
            runs.append((label, register, out, done, f, writer))
            rows[label] = list(done.values())
        todo = [p for p in pairs if any(p.pair not in done for _, _, _, done, _, _ in runs)]
        for k, item in enumerate(tqdm(todo, desc=", ".join(rows), unit="pair")):
            images = read_pair(item)
            for label, register, out, done, f, writer in (
                runs[k % len(runs) :] + runs[: k % len(runs)]
            ):
                if item.pair in done:
                    continue
                row = evaluate_pair(item, images, register, out, args.FIGURES)
                if row["reason"]:
                    tqdm.write(f"{label}: {item.pair} failed: {row['reason']}")
                writer.writerow(row)
                f.flush()
                rows[label].append(row)
    return [close_folder(label, out, rows[label], args) for label, _, out, *_ in runs]


def comparison(out, summaries, errors_by_method):
    """comparison.md / .csv and one success-rate figure with every method."""
    classical = [
        s["median_seconds"] for s in summaries if s["method"] in CLASSICAL and s["median_seconds"]
    ]
    fastest = min(classical) if classical else None
    keys = [
        "method",
        "mAUC",
        "AUC_S",
        "AUC_P",
        "AUC_A",
        "median_error_px",
        "failed",
        "inaccurate",
        "median_seconds",
        "p90_seconds",
        "speedup_vs_fastest_classical",
    ]
    table = []
    for s in summaries:
        speed = fastest / s["median_seconds"] if fastest and s["median_seconds"] else None
        table.append({**s, "speedup_vs_fastest_classical": speed})

    def cell(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in table]
    note = (
        f"\n{summaries[0]['n_pairs']} pairs, {summaries[0]['threads']} CPU threads for every "
        "method (NumPy's BLAS: 1); seconds from decoded images to matrix.\n"
    )
    write_atomic(out / "comparison.md", "\n".join(lines) + "\n" + note)
    text = (
        ",".join(keys)
        + "\n"
        + "".join(",".join(cell(r.get(k)) for k in keys) + "\n" for r in table)
    )
    write_atomic(out / "comparison.csv", text)
    success_figure(out / "success_rate.png", errors_by_method)
    print("\n".join(lines))


def written(folder, names):
    """One line naming a folder and the files just written there: ``folder/: a, b, c``."""
    return f"{Path(folder).as_posix().rstrip('/')}/: {', '.join(names)}"


def run_folder(args, methods):
    pairs = read_fire(args.DATA)
    set_threads(args.THREADS, any(m not in CLASSICAL for m in methods))  # after the checks
    out = Path(args.OUT)
    runs, names = [], {}
    for name in methods:
        label, register = make_method(name, args)
        if label in names:  # one folder, one per_pair.csv: the two would mix their rows
            raise InputError("--method", f"{names[label]} and {name} are both labelled {label} "
                             "(a model's file name); give one of them another name")  # fmt: skip
        names[label] = name
        folder = out if len(methods) == 1 else out / label
        runs.append((label, register, folder, run_settings(name, args)))
    summaries, errors, files = [], {}, []
    for (label, _, folder, _), (summary, errs) in zip(runs, evaluate_folder(pairs, runs, args)):
        summaries.append(summary)
        errors[label] = errs
        num = {k: "n/a" if v is None else f"{v:.3f}" for k, v in summary.items() if k != "method"}
        print(
            f"{label}: mAUC {num['mAUC']}, median error {num['median_error_px']} px, "
            f"{summary['failed']} failed, {summary['inaccurate']} inaccurate, "
            f"{summary['low_confidence']} low confidence, "
            f"median {num['median_seconds']} s per pair"
        )
        names = [
            "summary.json",
            "per_pair.csv",
            "settings.json",
            "success_rate.png",
            "confidence.png",
        ]
        if args.FIGURES:
            count = len(list((folder / "figures").glob("*.png")))
            names.append(f"figures/ ({count} pair{'s' * (count != 1)})")
        files.append(f"{label} -> {written(folder, names)}")
    if len(methods) > 1:
        comparison(out, summaries, errors)
        names = ["comparison.md", "comparison.csv", "success_rate.png"]
        files.append(f"all methods -> {written(out, names)}")
    print("\n".join(files))


def run_pair(args, methods):
    if len(methods) != 1:
        raise InputError(args.METHOD, "give one method for a single pair")
    fixed, moving = read_image(args.FIXED), read_image(args.MOVING)
    set_threads(args.THREADS, any(m not in CLASSICAL for m in methods))  # after the checks
    label, register = make_method(methods[0], args)
    result, seconds = timed(register, fixed, moving)
    out = Path(args.OUT)
    if result.fixed_from_moving is None:
        write_json(
            out / "result.json",
            {
                "method": label,
                "fixed_from_moving": None,
                "reason": result.reason,
                "seconds": seconds,
            },
        )
        raise InputError(args.MOVING, f"registration failed: {result.reason}")
    m = result.fixed_from_moving
    write_json(
        out / "result.json",
        {
            "method": label,
            "fixed": str(args.FIXED),
            "moving": str(args.MOVING),
            "transform": m.model,
            "fixed_from_moving": m.matrix.tolist(),
            "confidence": result.confidence,
            "seconds": seconds,
            "threads": args.THREADS,
            "convention": CONVENTION[m.model],
        },
    )
    warped = warp_to_fixed(fixed, moving, m)  # in the fixed image's decoded pixels
    images = {
        "warped.png": warped,
        "overlay.png": overlay(fixed.pixels, warped)[:, :, ::-1],  # RGB -> OpenCV's BGR
        "checkerboard.png": checkerboard(equalise(fixed.pixels), equalise(warped)),
    }
    for name, img in images.items():
        ok, data = cv2.imencode(".png", img)
        write_atomic(out / name, data.tobytes())
    low = result.confidence < args.LOW_CONFIDENCE
    doubt = " (low: the result is probably wrong)" if low else ""
    print(
        f"fixed_from_moving ({m.model}) {json.dumps(rounded(m.matrix))}; "
        f"confidence {result.confidence:.2f}{doubt}; {seconds * 1000:.1f} ms -> "
        + written(out, ["result.json", *images])
    )


CONVENTION = {  # result.json's note on its matrix (common.Transform)
    "affine": "M maps (x, y) pixels of the moving file to pixels of the fixed file: "
    "M @ [x, y, 1]; cv2.warpAffine(moving, M, fixed_size) lays moving over fixed",
    "quadratic": "M maps (x, y) pixels of the moving file to pixels of the fixed file: "
    "M @ [x, y, 1, x*x, x*y, y*y]; common.Transform(M).warp lays moving over fixed",
}


def rounded(matrix):
    """A Transform's matrix as nested lists for one printed line: its affine columns to 4
    decimals, its quadratic ones to 4 significant digits."""
    return [[round(v, 4) if j < 3 else float(f"{v:.4g}") for j, v in enumerate(r)] for r in matrix]


def main(args):
    methods = list(dict.fromkeys(m.strip() for m in args.METHOD.split(",") if m.strip()))
    if args.TRANSFORM not in MODELS:
        raise InputError("--transform", f"must be {' or '.join(MODELS)}, not {args.TRANSFORM!r}")
    if bool(args.FIXED) != bool(args.MOVING):
        raise InputError("--fixed/--moving", "give both images of the pair")
    if args.FIXED:
        run_pair(args, methods)
    else:
        run_folder(args, methods)


if __name__ == "__main__":
    exit_on_input_error(lambda: main(cli(globals(), __doc__)))
