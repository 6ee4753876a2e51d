"""Synthetic training pairs look like real follow-ups, and the fine stage cuts its patches in the
right frames."""

import json
import re

import cv2
import numpy as np
import pytest
from skimage import data

import DatasetCreator
import registrar
from common import InputError, apply_affine, cli, fit_affine, read_fire, square_frame


@pytest.fixture(scope="module")
def photo():
    bgr = cv2.cvtColor(data.retina(), cv2.COLOR_RGB2BGR)
    bgr = cv2.resize(bgr, (700, 700), interpolation=cv2.INTER_AREA)
    return ("retina", bgr, DatasetCreator.source_disc(bgr))


def framed(photo, kind):
    """The retina photograph as other cameras frame it: its field of view cut at top and bottom
    by the frame (IDRiD), running off one side (some of STARE's), or filling it (a scanning-laser
    image, or a crop inside the aperture)."""
    bgr = photo[1]
    bgr = {
        "clipped": bgr[110:590],
        "off-side": bgr[:, 160:],
        "full-frame": cv2.resize(bgr[200:500, 170:530], (432, 360)),
    }.get(kind, bgr)
    bgr = np.ascontiguousarray(bgr)
    return (kind, bgr, DatasetCreator.source_disc(bgr))


FRAMES = ["round", "clipped", "off-side", "full-frame"]


def settings(*argv):
    return cli(vars(DatasetCreator), "", ["--synth-size", "384", *argv])


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("seed", range(6))
def test_the_aperture_stays_put_and_the_photographs_border_never_shows(photo, frame, seed):
    """The camera does not move: fixed and moving have the SAME field of view, whatever the
    motion (the largest the settings allow). And both views sample the retina only inside the
    photograph's own field of view and inside its frame: no dark edge of the source moves with
    the retina, whether the source's field of view is round, cut by the frame or fills it."""
    args = settings("--full-frame-share", "0.3", "--lesion-share", "0", "--flare-share", "0")
    rng = np.random.default_rng(seed)
    fixed, moving, fixed_from_moving, _ = DatasetCreator.synthetic_pair(
        rng, framed(photo, frame), args
    )
    seen = [img.max(axis=-1) > 0 for img in (fixed, moving)]
    assert np.count_nonzero(seen[0] != seen[1]) < 0.002 * seen[0].size
    # inside the aperture, nothing as dark as the photograph's own surround (a moved border
    # would show as a black crescent): at most a few stray pixels (noise, deep shadow)
    inner = cv2.erode(seen[0].astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    for img in (fixed, moving):
        assert np.count_nonzero(img.max(axis=-1)[inner] < 4) < 0.002 * inner.sum()
    # the motion is the one asked for: the moving view's centre lands where the matrix says
    centre = np.array([[191.5, 191.5]])
    shift = apply_affine(fixed_from_moving, centre) - centre
    assert np.linalg.norm(shift) <= 0.45 * 384 + 1e-6


@pytest.mark.parametrize("frame", FRAMES)
def test_source_disc_is_inside_the_photographs_field_of_view_and_frame(photo, frame):
    """The largest disc in the field of view ends at the frame's edges too (OpenCV's distance
    transform alone does not see them: a field of view cut by the frame gave a disc reaching out
    of it, one filling the frame an infinite radius)."""
    _, bgr, ((x, y), radius) = framed(photo, frame)
    height, width = bgr.shape[:2]
    expected = {"round": 0.47 * 700, "clipped": 240, "off-side": 270, "full-frame": 180}
    assert 0.9 * expected[frame] < radius <= min(x + 1, y + 1, width - x, height - y)
    ring = [(x + radius * 0.98 * np.cos(t), y + radius * 0.98 * np.sin(t)) for t in range(12)]
    assert all(bgr[int(py), int(px)].max() > 10 for px, py in ring)


def test_a_sample_from_photographs_without_a_round_aperture(tmp_path, photo):
    """--write-sample from a folder of frame-filling photographs (scanning-laser images) and of
    frame-cut ones writes its pairs (it stopped with an OpenCV error on the first kind)."""
    folder = tmp_path / "slo"
    folder.mkdir()
    for frame in ("full-frame", "clipped"):
        cv2.imwrite(str(folder / f"{frame}.png"), framed(photo, frame)[1])
    out = tmp_path / "sample"
    argv = ["--photos", str(folder), "--retina", "false", "--write-sample", str(out)]
    DatasetCreator.main(settings(*argv, "--sample-pairs", "3"))
    pairs = read_fire(out)
    assert [p.pair for p in pairs] == ["A01", "P01", "S01"] and not any(p.problem for p in pairs)


def test_several_photo_folders_in_one_run(tmp_path, photo):
    folders = []
    for k in range(2):
        folder = tmp_path / f"camera{k}"
        folder.mkdir()
        cv2.imwrite(str(folder / f"photo{k}.png"), np.rot90(photo[1], k).copy())
        folders.append(str(folder))
    out = tmp_path / "patches"
    argv = ["--photos", ",".join(folders), "--retina", "false", "--out", str(out)]
    argv += ["--pairs-per-photo", "2", "--samples-per-pair", "2", "--val-fraction", "0.5"]
    DatasetCreator.main(settings(*argv))
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["sources"]) == ["photo0.png", "photo1.png"]
    assert len(manifest["validation_sources"]) == 1
    assert manifest["command"].startswith("python") and manifest["seconds"] > 0
    assert sum(s["count"] for s in manifest["shards"]) == 2 * 2 * 2


def test_pyramid_patches_are_cut_in_the_views_frame():
    """A patch at (left, top) of a view of side S is that square of the view: the same pixels as
    cv2.warpAffine of the image into the view, for a view at the image's scale and one at half."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (500, 700), dtype=np.uint8), (0, 0), 2)
    pyramid = registrar.Pyramid(image)
    for size in (700, 350):
        view_from_image = square_frame(image.shape, size)
        view = cv2.warpAffine(image, view_from_image[:2], (size, size))
        image_from_view = np.linalg.inv(view_from_image)
        corners = [(100, 120), (20, 200), (size - 64, size // 2)]
        at = np.stack([image_from_view @ registrar.translation(x, y) for x, y in corners])
        patches = pyramid.patches(at, 64)
        for patch, (x, y) in zip(patches, corners):
            expected = view[y : y + 64, x : x + 64].astype(float)
            assert np.abs(patch - expected).mean() < (1.0 if size == 700 else 4.0)


@pytest.mark.parametrize("seed", range(3))
def test_a_moved_real_pair_keeps_its_control_points_true(photo, seed):
    """--write-moved: the crops of a pair moved apart, with their control points taken along.
    Here the 'pair' is one photograph and a copy rotated by 3 degrees: the control points' affine
    then carries the moving crop onto the fixed one, the motion is as large as asked, and the
    same round aperture lies over both crops, inside which inside_both_apertures finds the points
    that both crops see."""
    _, bgr, _ = photo
    rotate = np.vstack([cv2.getRotationMatrix2D((350, 350), 3, 1.0), [0, 0, 1]])  # moving <- fixed
    moving = cv2.warpAffine(bgr, rotate[:2], (700, 700))
    grid = np.stack(np.meshgrid(np.arange(200, 520, 80), np.arange(200, 520, 80)), -1)
    fixed_points = grid.reshape(-1, 2).astype(np.float64)
    points = np.hstack([fixed_points, apply_affine(rotate, fixed_points)])
    args = settings()
    fixed_crop, moving_crop, moved = DatasetCreator.moved_pair(
        np.random.default_rng(seed), bgr, moving, points, args
    )
    side = fixed_crop.shape[0]
    a, residual = fit_affine(moved[:, 2:4], moved[:, 0:2])  # fixed crop <- moving crop
    assert residual.max() < 0.01  # the moved points still obey one affine
    warped = cv2.warpAffine(moving_crop, a, (side, side))
    both = (fixed_crop.max(axis=-1) > 0) & (warped.max(axis=-1) > 0)
    both = cv2.erode(both.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert both.mean() > 0.2  # a large motion, but an overlap
    difference = np.abs(fixed_crop.astype(int) - warped.astype(int))[both]
    assert np.median(difference) < 6  # the same retina where both crops see it
    centre = np.array([[side / 2, side / 2]])
    shift = np.linalg.norm(apply_affine(a, centre) - centre) / side
    assert args.MAX_SHIFT / 2 - 0.02 <= shift <= args.MAX_SHIFT + 0.02
    apertures = [img.max(axis=-1) > 0 for img in (fixed_crop, moving_crop)]
    assert np.count_nonzero(apertures[0] != apertures[1]) < 0.01 * side * side  # it stays put
    inside = DatasetCreator.inside_both_apertures(moved, side)
    xy = np.rint(moved).astype(int)
    seen = [
        aperture[np.clip(y, 0, side - 1), np.clip(x, 0, side - 1)]
        & (x == np.clip(x, 0, side - 1))
        & (y == np.clip(y, 0, side - 1))
        for aperture, (x, y) in zip(apertures, (xy[:, 0:2].T, xy[:, 2:4].T))
    ]
    centre, radius = DatasetCreator.aperture_circle(side)
    rim = np.any(
        [np.abs(np.hypot(*(moved[:, k : k + 2] - centre).T) - radius) < 2 for k in (0, 2)], 0
    )
    assert np.array_equal(inside[~rim], (seen[0] & seen[1])[~rim])
    assert 0 < inside.sum() < len(inside)  # a large motion: some points are seen by one crop only


def test_write_moved_makes_p_pairs_from_the_s_pairs_of_a_fire_folder(tmp_path, photo, capsys):
    _, bgr, _ = photo
    source = tmp_path / "real"
    (source / "Images").mkdir(parents=True)
    (source / "Ground Truth").mkdir()
    for pair in ("S01", "P01"):  # only S pairs are moved: a P pair already has little overlap
        cv2.imwrite(str(source / "Images" / f"{pair}_1.jpg"), bgr)
        cv2.imwrite(str(source / "Images" / f"{pair}_2.jpg"), bgr)
        rows = "".join(f"{x} {y} {x} {y}\n" for x in (250, 350, 450) for y in (250, 450))
        (source / "Ground Truth" / f"control_points_{pair}_1_2.txt").write_text(rows)
    (source / "Images" / "S02_1.jpg").write_bytes((source / "Images" / "S01_1.jpg").read_bytes())
    (source / "Images" / "S02_2.jpg").write_bytes(b"not an image")  # reported, then skipped
    (source / "Ground Truth" / "control_points_S02_1_2.txt").write_text(rows)
    whole = (source / "Images" / "S01_2.jpg").read_bytes()  # OpenCV alone would decode it
    (source / "Images" / "S03_1.jpg").write_bytes(whole)
    (source / "Images" / "S03_2.jpg").write_bytes(whole[: len(whole) // 2])
    (source / "Ground Truth" / "control_points_S03_1_2.txt").write_text(rows)
    out = tmp_path / "moved"
    argv = ["--write-moved", str(out), "--fire", str(source), "--moves-per-pair", "2"]
    DatasetCreator.main(cli(vars(DatasetCreator), "", argv))
    printed = capsys.readouterr().out
    assert "warning: skipped" in printed and "S02_2.jpg: not an image file" in printed
    assert "S03_2.jpg: truncated JPEG" in printed
    assert re.search(
        r"control points inside both apertures: median [0-9.]+ per pair, \d of 2", printed
    )
    pairs = read_fire(out)
    assert [p.pair for p in pairs] == ["P01", "P02"] and not any(p.problem for p in pairs)
    assert all(p.points.shape == (6, 4) for p in pairs)
    only_p = tmp_path / "only-p"
    (source / "Images" / "S01_1.jpg").rename(source / "Images" / "X01_1.jpg")
    with pytest.raises(InputError, match="no S pairs"):
        DatasetCreator.main(
            cli(vars(DatasetCreator), "", ["--write-moved", str(only_p), "--fire", str(source)])
        )
