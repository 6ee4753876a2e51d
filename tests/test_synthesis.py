"""Synthetic training pairs look like real follow-ups, and the fine stage cuts its patches in the
right frames."""

import json

import cv2
import numpy as np
import pytest
from skimage import data

import DatasetCreator
import registrar
from common import apply_affine, cli, square_frame


@pytest.fixture(scope="module")
def photo():
    bgr = cv2.cvtColor(data.retina(), cv2.COLOR_RGB2BGR)
    bgr = cv2.resize(bgr, (700, 700), interpolation=cv2.INTER_AREA)
    return ("retina", bgr, DatasetCreator.source_disc(bgr))


def settings(*argv):
    return cli(vars(DatasetCreator), "", ["--synth-size", "384", *argv])


@pytest.mark.parametrize("seed", range(6))
def test_the_aperture_stays_put_and_the_photographs_border_never_shows(photo, seed):
    """The camera does not move: fixed and moving have the SAME field of view, whatever the
    motion (the largest the settings allow). And both views sample the retina only inside the
    photograph's own field of view: no dark edge of the source moves with the retina."""
    args = settings("--full-frame-share", "0.3", "--lesion-share", "0", "--flare-share", "0")
    rng = np.random.default_rng(seed)
    fixed, moving, fixed_from_moving, _ = DatasetCreator.synthetic_pair(rng, photo, args)
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


def test_source_disc_is_inside_the_photographs_field_of_view(photo):
    (x, y), radius = photo[2]
    bgr = photo[1]
    assert 0.4 * 700 < radius < 0.5 * 700
    ring = [(x + radius * 0.98 * np.cos(t), y + radius * 0.98 * np.sin(t)) for t in range(12)]
    assert all(bgr[int(py), int(px)].max() > 10 for px, py in ring)


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
