"""The checkerboard and the files and lines Testing.py writes for a person to look at.

A pair made here: skimage.data.retina() at 384 px (fixed) and the same shifted by a known
translation (moving), so fixed_from_moving is a translation by minus that shift.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.data import retina

import Testing
from common import (
    Registration,
    Transform,
    apply_affine,
    equalise,
    read_image,
    scale_matrix,
    translation,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
SHIFT = (12.0, -7.0)  # moving = fixed moved this far (x, y), in pixels


def run(*args):
    command = [sys.executable, "Testing.py", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(fixed.png, moving.png, fixed_from_moving 2x3) in a FIRE-layout folder with its points."""
    root = tmp_path_factory.mktemp("pair")
    (root / "Images").mkdir()
    (root / "Ground Truth").mkdir()
    fixed = cv2.resize(cv2.cvtColor(retina(), cv2.COLOR_RGB2BGR), (384, 384), cv2.INTER_AREA)
    moving = cv2.warpAffine(fixed, translation(*SHIFT)[:2], (384, 384))
    cv2.imwrite(str(root / "Images" / "S01_1.png"), fixed)
    cv2.imwrite(str(root / "Images" / "S01_2.png"), moving)
    fixed_from_moving = translation(-SHIFT[0], -SHIFT[1])[:2]
    ring = 192 + 100 * np.stack([np.cos(np.arange(8)), np.sin(np.arange(8))], 1)
    points = np.hstack([apply_affine(fixed_from_moving, ring), ring])
    np.savetxt(root / "Ground Truth" / "control_points_S01_1_2.txt", points, fmt="%.3f")
    return root / "Images" / "S01_1.png", root / "Images" / "S01_2.png", fixed_from_moving


def test_checkerboard_tiles_alternate_between_the_two_images():
    h, w = 100, 120
    fixed, warped = np.full((h, w), 10, np.uint8), np.full((h, w), 200, np.uint8)
    board = Testing.checkerboard(fixed, warped)
    side = int(np.argmax(board[0] != 10))  # first column of the second tile
    assert side == round(max(h, w) / 8) == int(np.argmax(board[:, 0] != 10))  # square tiles
    assert (board[:side, :side] == 10).all()  # tile (0, 0): fixed
    assert (board[:side, side : 2 * side] == 200).all()  # tile (0, 1): warped
    assert (board[side : 2 * side, :side] == 200).all()  # tile (1, 0): warped
    assert (board[side : 2 * side, side : 2 * side] == 10).all()  # tile (1, 1): fixed
    rng = np.random.default_rng(0)  # any two images: each pixel from one of them, unchanged
    a, b = rng.integers(0, 256, (2, h, w), dtype=np.uint8)
    board = Testing.checkerboard(a, b)
    odd = (np.arange(h)[:, None] // side + np.arange(w) // side) % 2 == 1
    np.testing.assert_array_equal(board, np.where(odd, b, a))
    with pytest.raises(ValueError, match="one shape"):
        Testing.checkerboard(a, b[:, :-1])


def test_single_pair_writes_checkerboard_and_prints_one_line(pair, tmp_path):
    fixed_path, moving_path, truth = pair
    out = tmp_path / "out"
    lines = run("--fixed", fixed_path, "--moving", moving_path, "--method", "net", "--out", out)
    assert len(lines) == 1, lines
    names = ["result.json", "warped.png", "overlay.png", "checkerboard.png"]
    assert lines[0].startswith("fixed_from_moving (affine) [[") and " ms -> " in lines[0], lines[0]
    assert lines[0].endswith(f"{out.as_posix()}/: {', '.join(names)}"), lines[0]
    assert all((out / name).is_file() for name in names)
    board = cv2.imread(str(out / "checkerboard.png"), cv2.IMREAD_UNCHANGED)
    fixed = read_image(fixed_path).pixels
    assert board is not None and board.shape == fixed.shape == (384, 384)
    warped = cv2.imread(str(out / "warped.png"), cv2.IMREAD_UNCHANGED)
    expected = Testing.checkerboard(equalise(fixed), equalise(warped))
    np.testing.assert_array_equal(board, expected)
    m = np.array(json.loads((out / "result.json").read_text())["fixed_from_moving"])
    ring = 192 + 100 * np.stack([np.cos(np.arange(8)), np.sin(np.arange(8))], 1)
    error = np.linalg.norm(apply_affine(m, ring) - apply_affine(truth, ring), axis=1)
    assert error.max() < 2.0, error  # the checkerboard shows a registered pair


def test_pair_figure_has_the_checkerboard_and_its_zoom(pair, tmp_path):
    fixed_path, moving_path, truth = pair
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    titles = Testing.pair_figure(tmp_path / "S01.png", fixed, moving, Registration(truth, 1.0))
    assert len(titles) == 6 and sum("checkerboard" in t for t in titles) == 2, titles
    image = cv2.imread(str(tmp_path / "S01.png"))
    assert image.shape[:2] == (848, 1200)  # two rows of three panels, 15 x 10.6 in at dpi 80
    top, left, side = Testing.zoom_box(fixed.pixels, Testing.warp_to_fixed(fixed, moving, truth))
    assert side == 2 * round(384 / 8) and top % (side // 2) == 0 and left % (side // 2) == 0
    assert 0 <= top <= 384 - side and 0 <= left <= 384 - side
    failed = Registration(None, 0.0, "no matrix")  # a failed pair still gets its figure
    Testing.pair_figure(tmp_path / "failed.png", fixed, moving, failed)
    assert cv2.imread(str(tmp_path / "failed.png")) is not None


def test_batch_ends_by_naming_every_folder_and_file(pair, tmp_path):
    data = pair[0].parents[1]
    out = tmp_path / "out"
    lines = run("--data", data, "--method", "sift,orb", "--out", out, "--figures", "true")
    files = [line for line in lines if " -> " in line]
    assert [line.split(" -> ")[0] for line in files] == ["sift", "orb", "all methods"], lines
    assert lines[-3:] == files, lines  # at the end
    for line in files:
        folder, names = line.split(" -> ")[1].split("/: ")
        for name in names.split(", "):
            assert (Path(folder) / name.split(" ")[0]).exists(), (folder, name)
    assert "figures/ (1 pair)" in files[0] and "comparison.md" in files[2]
    figure = cv2.imread(str(out / "sift" / "figures" / "S01.png"))
    assert figure.shape[:2] == (848, 1200)


@pytest.fixture(scope="module")
def bent_pair(tmp_path_factory):
    """(fixed.png 512 x 512, moving.png 2400 x 2250, fixed_from_moving: a quadratic Transform in
    the files' pixels). The moving file is the fixed image bent by a quadratic (its edges by about
    6 px: moving pixel p shows fixed at bend(p), sampled there by cv2.remap), cut to 480 columns
    and enlarged 4.6875 times: read_image decodes it at half size, so the quadratic result goes
    through the decoded frames of both files."""
    root = tmp_path_factory.mktemp("bent")
    fixed = cv2.resize(cv2.cvtColor(retina(), cv2.COLOR_RGB2BGR), (512, 512), cv2.INTER_AREA)
    c = 511 / 2
    unit_from_pixel = np.array([[1 / c, 0, -1], [0, 1 / c, -1], [0, 0, 1]])  # edges at +-1
    b = 6.0 / c
    unit = [[1.02, 0.05, 10 / c, b, 0.5 * b, -0.5 * b], [-0.05, 1.02, -8 / c, 0.3 * b, -0.4 * b, b]]
    bend = Transform(unit).compose(np.linalg.inv(unit_from_pixel), unit_from_pixel)
    ys, xs = np.mgrid[0:512, 0:480]
    where = bend(np.stack([xs.ravel(), ys.ravel()], 1)).astype(np.float32).reshape(512, 480, 2)
    small = cv2.remap(fixed, where[..., 0], where[..., 1], cv2.INTER_LINEAR)
    moving = cv2.resize(small, (2250, 2400), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(root / "fixed.png"), fixed)
    cv2.imwrite(str(root / "moving.png"), moving)
    return root / "fixed.png", root / "moving.png", bend.compose(right=scale_matrix(480 / 2250))


def test_single_pair_with_transform_quadratic_writes_a_2x6_matrix(bent_pair, tmp_path):
    """--transform quadratic on one pair: result.json says "quadratic" and holds a 2x6
    fixed_from_moving in the files' pixels, close to the bend (measured: 0.05 px, the affine
    2 px); the printed line names the model and shows the matrix (its bending columns to 4
    significant digits); warped.png has the fixed image's shape and lies on it."""
    fixed_path, moving_path, truth = bent_pair
    out = tmp_path / "out"
    lines = run("--fixed", fixed_path, "--moving", moving_path, "--method", "net",
                "--transform", "quadratic", "--out", out)  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("fixed_from_moving (quadratic) [["), lines
    result = json.loads((out / "result.json").read_text())
    assert result["transform"] == "quadratic" and "x*x" in result["convention"]
    m = np.array(result["fixed_from_moving"])
    assert m.shape == (2, 6)
    grid = np.stack(np.meshgrid(np.linspace(300, 2000, 7), np.linspace(300, 2100, 7)), -1)
    grid = grid.reshape(-1, 2)
    error = np.linalg.norm(Transform(m)(grid) - truth(grid), axis=1)
    assert error.mean() < 0.5 and error.max() < 1.0, error
    printed = np.array(json.loads(lines[0].split(") ", 1)[1].split("; ")[0]))
    np.testing.assert_allclose(printed[:, :3], m[:, :3], rtol=0, atol=5e-5 + 1e-12)
    np.testing.assert_allclose(printed[:, 3:], m[:, 3:], rtol=5e-4 + 1e-9, atol=0)
    fixed = read_image(fixed_path).pixels
    warped = cv2.imread(str(out / "warped.png"), cv2.IMREAD_UNCHANGED)
    assert warped.shape == fixed.shape == (512, 512)
    both = (warped > 20) & (fixed > 20)
    assert both.mean() > 0.5
    assert np.abs(warped.astype(np.float64) - fixed)[both].mean() < 1.5  # measured 0.6 (affine 3.7)
