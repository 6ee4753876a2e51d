"""Robust under bad input and interruption: clear errors, nothing lost (the issue's checklist).

Everything is made here from skimage.data.retina() in tmp folders. The scripts run as a user runs
them (a subprocess in the repository root): a bad input must give exit code 2 and ONE line on
stderr naming the file and the problem, no traceback; a batch records bad pairs and goes on;
interrupted jobs (SIGKILL) resume and never leave a file that looks complete but is not.
Single-pair CLI cases use ``--method sift`` (no TensorFlow import: about 1 s each).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from common import (
    InputError,
    apply_affine,
    fire_error,
    read_control_points,
    read_image,
    scale_matrix,
    to3x3,
    translation,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------
# Helpers


def run(script, *args, timeout=300, env=ENV):
    """Run a script of the repository as a user would; returns the CompletedProcess."""
    command = [sys.executable, script, *map(str, args)]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def start(script, *args, log):
    """Start a script in the background, its output to ``log`` (never a pipe that can fill)."""
    handle = open(log, "w")
    command = [sys.executable, script, *map(str, args)]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT)
    proc.log_handle = handle
    return proc


def kill_when(proc, condition, timeout=120):
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fails if it ended before that. The
    process never outlives the test."""
    try:
        deadline = time.monotonic() + timeout
        while not condition():
            assert proc.poll() is None, f"ended before it could be interrupted: {proc.returncode}"
            assert time.monotonic() < deadline, "condition never held"
            time.sleep(0.01)
        assert proc.poll() is None, "finished before it could be interrupted"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc.log_handle.close()
    assert proc.returncode == -signal.SIGKILL


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_input_error(proc, path, *problem):
    """Exit code 2, no traceback, the last stderr line names ``path`` and one of ``problem``."""
    line = last_line(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert line.startswith("error: ") and str(path) in line, line
    assert any(word in line.lower() for word in problem), line


def retina_bgr():
    from skimage.data import retina

    return cv2.cvtColor(retina(), cv2.COLOR_RGB2BGR)


def view(retina, side, angle=0.0, zoom=1.0, shift=(0.0, 0.0)):
    """(image side x side, view_from_retina 3x3): the retina rotated and zoomed about its centre,
    shifted (retina px), then resized with INTER_AREA (OpenCV's pixel-centre convention)."""
    n = retina.shape[0]
    c = (n - 1) / 2
    motion = translation(*shift) @ to3x3(cv2.getRotationMatrix2D((c, c), angle, zoom))
    full = cv2.warpAffine(retina, motion[:2], (n, n), flags=cv2.INTER_LINEAR)
    image = cv2.resize(full, (side, side), interpolation=cv2.INTER_AREA)
    return image, scale_matrix(side / n) @ motion


def control_points(fixed_from_moving, moving_side, count=12):
    """(count, 4) FIRE rows ``x_f y_f x_m y_m`` on a ring well inside the moving field of view."""
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False)
    c = (moving_side - 1) / 2
    moving = np.stack(
        [c + 0.3 * moving_side * np.cos(angles), c + 0.3 * moving_side * np.sin(angles)], 1
    )
    return np.hstack([apply_affine(fixed_from_moving, moving), moving])


def write_jpeg(path, image, quality=95):
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    path.write_bytes(data.tobytes())
    return path


def write_points(path, points):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(f"{v:.3f}" for v in row) + "\n" for row in points))


# ----------------------------------------------------------------------------------------------
# Data made once: images, a FIRE folder with good and bad pairs, an untrained model


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Named image files (and the truth of each moving image against the 512 px fixed view)."""
    d = tmp_path_factory.mktemp("images")
    retina = retina_bgr()
    fixed, fixed_from_retina = view(retina, 512)
    files, truth = {}, {}

    def moving(name, side, **motion):
        image, moving_from_retina = view(retina, side, **motion)
        truth[name] = fixed_from_retina @ np.linalg.inv(moving_from_retina)
        return image

    files["fixed.jpg"] = write_jpeg(d / "fixed.jpg", fixed)
    files["moving.jpg"] = write_jpeg(
        d / "moving.jpg", moving("moving.jpg", 512, angle=4, zoom=1.05, shift=(30, -20))
    )
    files["moving640.jpg"] = write_jpeg(
        d / "moving640.jpg", moving("moving640.jpg", 640, angle=-6, zoom=0.95, shift=(-25, 10))
    )
    rgba = cv2.cvtColor(moving("rgba.png", 448, angle=3, shift=(10, 25)), cv2.COLOR_BGR2BGRA)
    for name, image in (
        ("grey.png", fixed[:, :, 1]),  # grayscale
        ("rgba.png", rgba),  # colour + alpha
        ("fixed16.png", fixed.astype(np.uint16) * 257),  # 16-bit colour
        ("grey16.png", fixed[:, :, 1].astype(np.uint16) * 257),  # 16-bit grey
        ("one_pixel.png", np.full((1, 1, 3), 128, np.uint8)),
        ("black.png", np.zeros((400, 400, 3), np.uint8)),
    ):
        cv2.imwrite(str(d / name), image)
        files[name] = d / name
    data = files["moving.jpg"].read_bytes()
    files["truncated.jpg"] = d / "truncated.jpg"
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    files["padded.jpg"] = d / "padded.jpg"  # a valid JPEG with padding after its end marker
    files["padded.jpg"].write_bytes(data + b"\0" * 200)
    files["empty.jpg"] = d / "empty.jpg"
    files["empty.jpg"].write_bytes(b"")
    files["not_image.jpg"] = d / "not_image.jpg"
    files["not_image.jpg"].write_text("this is a text file, not a photograph\n")
    files["missing.jpg"] = d / "missing.jpg"  # never written
    return files, truth


BAD_IMAGES = {  # file -> words of which one must be in the error line
    "missing.jpg": ("not found",),
    "not_image.jpg": ("not an image",),
    "truncated.jpg": ("truncated",),
    "empty.jpg": ("empty",),
    "one_pixel.png": ("too small",),
    "black.png": ("no content",),
}


@pytest.fixture(scope="session")
def big_pair(tmp_path_factory):
    """An 8000 x 8000 px JPEG of the retina and a 1000 px downscale of the same picture."""
    d = tmp_path_factory.mktemp("big")
    retina = retina_bgr()
    big = cv2.resize(retina, (8000, 8000), interpolation=cv2.INTER_CUBIC)
    write_jpeg(d / "big8000.jpg", big, quality=90)
    del big
    write_jpeg(d / "small1000.jpg", cv2.resize(retina, (1000, 1000), interpolation=cv2.INTER_AREA))
    return d / "big8000.jpg", d / "small1000.jpg"


def fire_folder(root, images):
    """A FIRE-layout folder: 3 good pairs (plain, grey + RGBA, 16-bit + other size) and every
    kind of bad pair. Returns {pair: words expected in its reason (None = must succeed)}."""
    files, truth = images
    (root / "Images").mkdir(parents=True)
    gt = root / "Ground Truth"

    def pair(name, fixed, moving, points="truth"):
        for index, src in ((1, fixed), (2, moving)):
            if src is not None:
                suffix = files[src].suffix if files[src].exists() else ".jpg"
                target = root / "Images" / f"{name}_{index}{suffix}"
                if files[src].exists():
                    shutil.copy(files[src], target)
        if points == "truth":
            side = max(cv2.imread(str(files[moving]), cv2.IMREAD_UNCHANGED).shape[:2])
            write_points(gt / f"control_points_{name}_1_2.txt", control_points(truth[moving], side))
        elif points is not None:
            gt.mkdir(exist_ok=True)
            (gt / f"control_points_{name}_1_2.txt").write_text(points)

    good = "1 2 3 4\n50 6 70 8\n9 100 11 120\n"  # well-formed (pairs failing on images)
    pair("S01", "fixed.jpg", "moving.jpg")
    pair("S02", "grey.png", "rgba.png")
    pair("P01", "fixed16.png", "moving640.jpg")
    pair("A01", "fixed.jpg", None, good)  # partner image missing
    pair("A02", "fixed.jpg", "moving.jpg", "1 2 3\n4 5 6\n7 8 9\n")  # 3 columns
    pair("A03", "fixed.jpg", "moving.jpg", "1 2 3 4\n5 six 7 8\n9 10 11 12\n")  # not numbers
    pair("A04", "fixed.jpg", "moving.jpg", "1 2 3 4\n5 6 7 8\n")  # 2 rows
    pair("A05", "fixed.jpg", "moving.jpg", None)  # no control-point file
    pair("S03", "fixed.jpg", "truncated.jpg", good)
    pair("S04", "empty.jpg", "moving.jpg", good)
    pair("S05", "fixed.jpg", "not_image.jpg", good)
    pair("S06", "one_pixel.png", "moving.jpg", good)
    pair("S07", "fixed.jpg", "black.png", good)
    return {
        "S01": None,
        "S02": None,
        "P01": None,
        "A01": ("A01_2.jpg", "partner image missing"),
        "A02": ("control_points_A02_1_2.txt", "columns"),
        "A03": ("control_points_A03_1_2.txt", "not numbers"),
        "A04": ("control_points_A04_1_2.txt", "at least 3"),
        "A05": ("control_points_A05_1_2.txt", "not found"),
        "S03": ("S03_2.jpg", "truncated"),
        "S04": ("S04_1.jpg", "empty"),
        "S05": ("S05_2.jpg", "not an image"),
        "S06": ("S06_1.png", "too small"),
        "S07": ("S07_2.png", "no content"),
    }


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """An untrained small network saved in the .keras format (what Testing --method path loads)."""
    from Network import build_network

    path = tmp_path_factory.mktemp("model") / "m.keras"
    build_network(64, "8,8,8,8,8", 16).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# read_image and read_control_points, in process


@pytest.mark.parametrize(
    "name", ["fixed.jpg", "grey.png", "rgba.png", "fixed16.png", "grey16.png", "padded.jpg"]
)
def test_read_image_accepts_grey_rgba_16bit_and_padded_jpeg(images, name):
    files, _ = images
    image = read_image(files[name])
    assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 2
    assert image.file_shape == image.pixels.shape
    np.testing.assert_array_equal(image.decoded_from_file, np.eye(3))
    if name in ("fixed.jpg", "fixed16.png", "grey16.png"):  # the same picture as grey.png
        reference = read_image(files["grey.png"]).pixels.astype(float).ravel()
        assert np.corrcoef(image.pixels.astype(float).ravel(), reference)[0, 1] > 0.99


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_read_image_rejects_bad_files_with_one_clear_line(images, name):
    files, _ = images
    with pytest.raises(InputError) as caught:
        read_image(files[name])
    message = str(caught.value)
    assert "\n" not in message and str(files[name]) in message
    assert any(word in message for word in BAD_IMAGES[name]), message


def test_read_image_decodes_8000px_jpeg_reduced_in_bounded_memory(big_pair):
    big, _ = big_pair
    image = read_image(big)
    assert image.file_shape == (8000, 8000)
    assert max(image.pixels.shape) <= 2048
    # decoded_from_file maps the file's corner pixel centres onto the decoded ones
    s = image.pixels.shape[0] / 8000
    np.testing.assert_allclose(image.decoded_from_file, scale_matrix(s))
    corners = apply_affine(image.decoded_from_file, [[-0.5, -0.5], [7999.5, 7999.5]])
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [image.pixels.shape[0] - 0.5] * 2])
    # peak memory of a process that reads it: far below one full-size colour decode (192 MB)
    code = (
        "import resource, sys; from common import read_image; read_image(sys.argv[1]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(big)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    baseline = subprocess.run(
        [sys.executable, "-c", code.replace("read_image(sys.argv[1]); ", "")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    extra_mb = (int(proc.stdout) - int(baseline.stdout)) / 1024
    assert extra_mb < 120, f"reading the 8000 px JPEG took {extra_mb:.0f} MB more"


def test_read_image_ignores_exif_orientation_at_every_size(tmp_path):
    """Control points are in stored pixels: a reduced decode must not apply EXIF rotation."""
    from PIL import Image

    rgb = cv2.resize(retina_bgr(), (2400, 1600))[:, :, ::-1]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    image = read_image(tmp_path / "rotated.jpg")
    assert image.file_shape == (1600, 2400)
    assert image.pixels.shape == (800, 1200)
    np.testing.assert_allclose(image.decoded_from_file, scale_matrix(0.5))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("1 2 3\n4 5 6\n7 8 9\n", "line 1 has 3 columns"),
        ("1 2 3 4\n5 6 7 8 9\n1 2 3 4\n", "line 2 has 5 columns"),
        ("1 2 3 4\nfive 6 7 8\n1 2 3 4\n", "not numbers"),
        ("1 2 3 4\n5 6 7 8\n", "need at least 3"),
        ("", "need at least 3"),
        ("1 2 3 4\n5 6 nan 8\n9 1 2 3\n", "not finite"),
    ],
)
def test_read_control_points_rejects_malformed_files(tmp_path, text, problem):
    path = tmp_path / "control_points_X01_1_2.txt"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        read_control_points(path)
    assert str(path) in str(caught.value) and problem in str(caught.value)


# ----------------------------------------------------------------------------------------------
# Testing.py --fixed/--moving


@pytest.mark.parametrize("role", ["fixed", "moving"])
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_testing_pair_with_bad_image_exits_2_with_one_line(images, tmp_path, name, role):
    files, _ = images
    bad, good = files[name], files["fixed.jpg"]
    fixed, moving = (bad, good) if role == "fixed" else (good, bad)
    proc = run("Testing.py", "--fixed", fixed, "--moving", moving, "--method", "sift",
               "--out", tmp_path / "out")  # fmt: skip
    assert_input_error(proc, bad, *BAD_IMAGES[name])
    assert not (tmp_path / "out" / "result.json").exists()


def test_testing_pair_with_only_one_image_exits_2(images, tmp_path):
    files, _ = images
    proc = run("Testing.py", "--fixed", files["fixed.jpg"], "--method", "sift", "--out", tmp_path)
    assert_input_error(proc, "--fixed/--moving", "give both")


@pytest.mark.parametrize(
    "fixed, moving",
    [("grey.png", "rgba.png"), ("fixed16.png", "moving640.jpg"), ("grey16.png", "moving.jpg")],
)
def test_testing_pair_grey_rgba_16bit_and_other_sizes_register_in_file_pixels(
    images, tmp_path, fixed, moving
):
    files, truth = images
    proc = run("Testing.py", "--fixed", files[fixed], "--moving", files[moving],
               "--method", "sift", "--out", tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    m = np.array(result["fixed_from_moving"])
    side = cv2.imread(str(files[moving]), cv2.IMREAD_UNCHANGED).shape[0]
    assert fire_error(m, control_points(truth[moving], side)) < 1.5
    warped = cv2.imread(str(tmp_path / "warped.png"), cv2.IMREAD_UNCHANGED)
    assert warped.shape == (512, 512)


def test_testing_pair_8000px_image_matrix_in_its_own_pixels(big_pair, tmp_path):
    """Register the 8000 px image (moving) onto its 1000 px downscale (fixed): the matrix must be
    the resize itself, diag(1/8) with OpenCV's half-pixel offset, in the files' pixels."""
    big, small = big_pair
    start_time = time.monotonic()
    proc = run("Testing.py", "--fixed", small, "--moving", big, "--method", "sift",
               "--out", tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start_time < 60
    m = np.array(json.loads((tmp_path / "result.json").read_text())["fixed_from_moving"])
    expected = scale_matrix(0.125)[:2]
    np.testing.assert_allclose(m[:, :2], expected[:, :2], atol=0.002)
    grid = np.stack(np.meshgrid([1000, 4000, 7000], [1000, 4000, 7000]), -1).reshape(-1, 2)
    error = np.linalg.norm(apply_affine(m, grid) - apply_affine(expected, grid), axis=1)
    assert error.max() < 1.5, error  # in the fixed (1000 px) file's pixels


def test_testing_pair_that_cannot_be_registered_exits_2_naming_it(images, tmp_path):
    files, _ = images
    noise = np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "noise.png"), cv2.GaussianBlur(noise, (0, 0), 3))
    proc = run("Testing.py", "--fixed", files["fixed.jpg"], "--moving", tmp_path / "noise.png",
               "--method", "sift", "--out", tmp_path / "out")  # fmt: skip
    assert_input_error(proc, tmp_path / "noise.png", "registration failed")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["fixed_from_moving"] is None


def test_testing_resume_keeps_complete_rows_only(tmp_path):
    """A per_pair.csv cut by a kill mid-row: RESUME keeps the complete rows, redoes the torn one."""
    from Testing import COLUMNS, read_rows

    good = dict.fromkeys(COLUMNS, "1") | {"pair": "S01", "category": "S", "reason": ""}
    failed = dict.fromkeys(COLUMNS, "") | {"pair": "S02", "category": "S", "reason": "x: empty"}
    path = tmp_path / "per_pair.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows([good, failed, good | {"pair": "S03"}])
    text = path.read_text()
    path.write_text(text[: text.rindex("S03") + 12])  # torn inside the last row
    rows = read_rows(path)
    assert set(rows) == {"S01", "S02"} and rows["S02"]["reason"] == "x: empty"


def test_testing_resume_redoes_rows_made_with_other_settings(tmp_path):
    """RESUME keeps the rows of a run made the same way, and redoes those made another way (here
    with other threads: other times), saying so; settings.json records what they depend on."""
    out = tmp_path / "out"
    args = ["--data", "data/sample", "--method", "orb", "--out", out, "--figures", "false"]
    assert run("Testing.py", *args).returncode == 0
    rows = read_csv(out / "per_pair.csv")
    rows["S01"]["error_px"] = "999"  # a row that shows whether it was kept
    with open(out / "per_pair.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows["S01"]))
        writer.writeheader()
        writer.writerows(rows.values())
    same = run("Testing.py", *args)
    assert same.returncode == 0 and "redone" not in same.stdout + same.stderr
    assert read_csv(out / "per_pair.csv")["S01"]["error_px"] == "999"
    other = run("Testing.py", *args, "--threads", "1")
    assert other.returncode == 0 and "6 rows" in other.stdout and "redone" in other.stdout
    assert read_csv(out / "per_pair.csv")["S01"]["error_px"] != "999"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["threads"] == 1 and settings["method"] == "orb"
    assert settings["orb_features"] == 1000  # and ORB's operating point:
    another = run("Testing.py", *args, "--threads", "1", "--orb-features", "900")
    assert another.returncode == 0 and "redone" in another.stdout


MATRIX = [f"m{i}{j}" for i in range(2) for j in range(6)]
QUADRATIC_ONLY = [f"m{i}{j}" for i in range(2) for j in range(3, 6)]


def test_testing_batch_with_transform_quadratic_and_resume_with_the_other(tmp_path):
    """--transform quadratic: per_pair.csv has a transform column and a 2x6 matrix (the affine's
    rows leave m03-m05 and m13-m15 empty); the net's rows are quadratics (a pair whose patches
    do not hold one keeps the affine), every cell of a quadratic is filled, and each row's matrix
    gives its error_px. settings.json records the transform, and a rerun with the other
    --transform redoes the rows (RESUME), saying they were made with other settings."""
    from common import Transform, read_fire

    out = tmp_path / "out"
    args = ["--data", "data/sample", "--out", out, "--figures", "false"]
    proc = run("Testing.py", *args, "--method", "net,sift", "--transform", "quadratic")
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = {p.pair: p.points for p in read_fire(ROOT / "data" / "sample")}
    for method in ("net", "sift"):
        with open(out / method / "per_pair.csv", newline="") as f:
            assert next(csv.reader(f)) == [
                "pair", "category", "error_px", "seconds", "transform", *MATRIX,
                "confidence", "inaccurate", "reason",
            ]  # fmt: skip
        rows = read_csv(out / method / "per_pair.csv")
        assert sorted(rows) == sorted(points)
        assert json.loads((out / method / "settings.json").read_text())["transform"] == "quadratic"
        registered = [r for r in rows.values() if r["reason"] == ""]
        quadratic = [r for r in registered if r["transform"] == "quadratic"]
        assert all(r["transform"] in ("affine", "quadratic") for r in registered), rows
        assert len(quadratic) >= len(rows) - 2, rows  # measured: 5 of 6 for both
        for r in registered:
            columns = MATRIX if r["transform"] == "quadratic" else MATRIX[:3] + MATRIX[6:9]
            assert all(r[c] != "" for c in columns), r
            assert r["transform"] == "quadratic" or all(r[c] == "" for c in QUADRATIC_ONLY), r
            m = np.array([float(r[c]) for c in columns]).reshape(2, -1)
            error = fire_error(Transform(m), points[r["pair"]])
            assert error == pytest.approx(float(r["error_px"]), abs=1e-3), r
    net = read_csv(out / "net" / "per_pair.csv")
    assert all(r["reason"] == "" for r in net.values())
    assert all(float(r["error_px"]) < 3.0 for r in net.values()), net
    # one method alone writes into --out itself: the folder that the sift rows above are in
    again = run("Testing.py", "--data", "data/sample", "--out", out / "sift", "--figures", "false",
                "--method", "sift", "--transform", "affine")  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "made with other settings" in again.stdout and "redone" in again.stdout, again.stdout
    rows = read_csv(out / "sift" / "per_pair.csv")
    assert sorted(rows) == sorted(points)
    for r in rows.values():
        assert r["transform"] in ("affine", "") and all(r[c] == "" for c in QUADRATIC_ONLY), r
    assert sum(r["transform"] == "affine" for r in rows.values()) >= 5
    assert json.loads((out / "sift" / "settings.json").read_text())["transform"] == "affine"


def test_testing_runs_the_methods_pair_by_pair_in_turn_and_resumes_each(tmp_path, monkeypatch):
    """Several methods register each pair in turn, the first rotating from pair to pair (a busy
    moment of the machine slows them all alike), every pair's images read once; rows a method
    already has (RESUME) are not redone, while the other methods still run on that pair."""
    import Testing
    from common import Registration, cli, read_fire

    pairs = read_fire(ROOT / "data" / "sample")
    args = cli(vars(Testing), "", ["--figures", "false"])
    calls, reads = [], []
    monkeypatch.setattr(Testing, "read_pair", lambda item, read=Testing.read_pair: (
        reads.append(item.pair), read(item))[1])  # fmt: skip

    def method(label):
        def register(fixed, moving):
            calls.append(label)
            return Registration(np.eye(3)[:2], 1.0)

        return label, register, tmp_path / label, {"method": label}

    Testing.evaluate_folder(pairs, [method("a"), method("b"), method("c")], args)
    assert reads == [p.pair for p in pairs]  # once each
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"] * 2
    path = tmp_path / "b" / "per_pair.csv"
    path.write_text("\n".join(path.read_text().splitlines()[:5]) + "\n")  # killed after 4 rows
    calls.clear()
    Testing.evaluate_folder(pairs, [method("a"), method("b")], args)
    assert calls == ["b", "b"]  # a has every row; b redoes its last two pairs only
    assert sorted(read_csv(path)) == sorted(p.pair for p in pairs)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["n_pairs"] == len(pairs)
    calls.clear()  # a pair gone from the folder: its row goes from per_pair.csv as from the summary
    Testing.evaluate_folder(pairs[1:], [method("b")], args)
    assert calls == [] and sorted(read_csv(path)) == sorted(p.pair for p in pairs[1:])


def test_the_settings_of_a_net_run_name_its_model_code_and_procedure(tmp_path, monkeypatch):
    """What RESUME compares for the network: the procedure's settings, the model's bytes (a
    retrained model saved under the same name is another model) and the code's."""
    import Testing
    from common import cli

    model = tmp_path / "m.keras"
    model.write_bytes(b"one model")
    code = tmp_path / "code"  # a copy of the sources, to change one
    code.mkdir()
    for name in ("Testing.py", "common.py", "registrar.py", "Network.py", "classical.py"):
        (code / name).write_bytes((ROOT / name).read_bytes())
    monkeypatch.setattr(Testing, "__file__", str(code / "Testing.py"))

    def settings(*flags):
        return Testing.run_settings("net", cli(vars(Testing), "", ["--model", str(model), *flags]))

    first = settings()
    assert first["dense_below"] == Testing.DENSE_BELOW and first == settings()
    assert first != settings("--dense-below", "0")
    (code / "registrar.py").write_bytes((code / "registrar.py").read_bytes() + b"# changed")
    assert first != settings()
    (code / "registrar.py").write_bytes((ROOT / "registrar.py").read_bytes())
    model.write_bytes(b"another model")
    assert first != settings()


# ----------------------------------------------------------------------------------------------
# Testing.py --data: one batch with every kind of bad pair, sift and the net side by side


@pytest.fixture(scope="session")
def batch(tmp_path_factory, images, model_path):
    root = tmp_path_factory.mktemp("fire")
    expected = fire_folder(root / "data", images)
    out = root / "results"
    proc = run("Testing.py", "--data", root / "data", "--method", f"sift,{model_path}",
               "--out", out, "--figures", "true")  # fmt: skip
    return proc, out, expected, root / "data"


def read_csv(path):
    with open(path, newline="") as f:
        return {row["pair"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("method", ["sift", "m"])
def test_testing_batch_records_bad_pairs_and_goes_on(batch, images, method):
    proc, out, expected, data = batch
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = read_csv(out / method / "per_pair.csv")
    assert set(rows) == set(expected)
    for pair, want in expected.items():
        row = rows[pair]
        if want is None:  # a good pair (plain, grey + RGBA, 16-bit + another size)
            assert row["reason"] == "" and row["error_px"] != "", row
            assert np.isfinite(float(row["error_px"])) and row["m00"] != ""
            if method == "sift":  # a real method registers them accurately
                assert float(row["error_px"]) < 1.5, row
        else:
            file_name, problem = want
            assert row["error_px"] == "" and row["m00"] == "", row
            assert file_name in row["reason"] and problem in row["reason"], row["reason"]
    summary = json.loads((out / method / "summary.json").read_text())
    assert summary["n_pairs"] == len(expected)
    assert summary["failed"] == sum(1 for v in expected.values() if v is not None)
    assert (out / "comparison.md").exists()
    assert not list(out.rglob("*.part*"))


def test_comparison_table_and_figure_are_written(batch):
    proc, out, expected, data = batch
    with open(out / "comparison.csv", newline="") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    assert set(table) == {"sift", "m"}
    for column in ("mAUC", "AUC_S", "AUC_P", "AUC_A", "median_error_px", "failed", "inaccurate",
                   "median_seconds", "p90_seconds", "speedup_vs_fastest_classical"):  # fmt: skip
        assert column in table["sift"], column
    assert float(table["sift"]["speedup_vs_fastest_classical"]) == 1.0  # sift is the only one
    summary = json.loads((out / "sift" / "summary.json").read_text())
    assert float(table["sift"]["mAUC"]) == pytest.approx(summary["mAUC"], abs=1e-3)
    markdown = (out / "comparison.md").read_text()
    assert markdown.startswith("| method | mAUC |") and "| sift |" in markdown
    assert "2 CPU threads for every method" in markdown
    assert (out / "success_rate.png").stat().st_size > 5000


def test_testing_batch_of_only_bad_pairs_still_summarises(images, tmp_path):
    """Every pair fails and none is of category S, P or A (no AUC, no timing): still a summary."""
    files, _ = images
    (tmp_path / "data" / "Images").mkdir(parents=True)
    shutil.copy(files["fixed.jpg"], tmp_path / "data" / "Images" / "X01_1.jpg")  # no partner
    shutil.copy(files["black.png"], tmp_path / "data" / "Images" / "X02_1.png")
    shutil.copy(files["fixed.jpg"], tmp_path / "data" / "Images" / "X02_2.jpg")
    write_points(tmp_path / "data" / "Ground Truth" / "control_points_X02_1_2.txt", np.ones((4, 4)))
    proc = run("Testing.py", "--data", tmp_path / "data", "--method", "sift",
               "--out", tmp_path / "out")  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_pairs"] == 2 and summary["failed"] == 2 and summary["mAUC"] is None
    rows = read_csv(tmp_path / "out" / "per_pair.csv")
    assert "X01_2.jpg: partner image missing" in rows["X01"]["reason"]
    assert "X02_1.png: image has no content" in rows["X02"]["reason"]


@pytest.mark.parametrize("layout", ["missing", "no_images", "empty_images"])
def test_testing_data_that_is_not_a_fire_folder_exits_2(tmp_path, layout):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "empty_images":
        (data / "Images").mkdir()
    proc = run("Testing.py", "--data", data, "--method", "sift", "--out", tmp_path / "out")
    assert_input_error(proc, data, "not found", "not a fire", "no images")


# ----------------------------------------------------------------------------------------------
# Models: .keras only, safe mode, clear errors


@pytest.fixture(scope="session")
def bad_models(tmp_path_factory, model_path):
    import keras

    d = tmp_path_factory.mktemp("bad_models")
    (d / "garbage.keras").write_bytes(b"this is not a zip archive")
    data = model_path.read_bytes()
    (d / "truncated.keras").write_bytes(data[: len(data) // 2])
    (d / "model.pkl").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.")
    shutil.copy(model_path, d / "model.h5")  # right content, wrong format name
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)  # arbitrary Python code
    keras.Model(inputs, outputs).save(d / "lambda.keras")
    return d


@pytest.mark.parametrize(
    "name, problem",
    [
        ("garbage.keras", "not a keras model archive"),
        ("truncated.keras", "not a keras model archive"),
        ("model.pkl", "not a .keras model file"),
        ("model.h5", "not a .keras model file"),
        ("missing.keras", "not found"),
        ("lambda.keras", "cannot load the model"),  # safe mode refuses the lambda
    ],
)
def test_load_network_refuses_what_is_not_a_safe_keras_model(bad_models, name, problem):
    from Network import load_network

    with pytest.raises(InputError) as caught:
        load_network(bad_models / name)
    assert str(bad_models / name) in str(caught.value)
    assert problem in str(caught.value).lower(), str(caught.value)


@pytest.mark.parametrize(
    "flags, name, problem",
    [
        (("--method",), "garbage.keras", "not a keras model archive"),
        (("--method", "net", "--model"), "model.pkl", "not a .keras model file"),
    ],
)
def test_testing_with_a_bad_model_file_exits_2(images, bad_models, tmp_path, flags, name, problem):
    files, _ = images
    proc = run("Testing.py", "--fixed", files["fixed.jpg"], "--moving", files["moving.jpg"],
               *flags, bad_models / name, "--out", tmp_path)  # fmt: skip
    assert_input_error(proc, bad_models / name, problem)


def test_testing_with_two_models_of_one_name_exits_2(model_path, tmp_path):
    """Two models whose files share a name would share a results folder and its per_pair.csv
    (each method's folder is named by its label): one line, before any pair is registered."""
    other = tmp_path / "other" / model_path.name
    other.parent.mkdir()
    shutil.copy(model_path, other)
    out = tmp_path / "out"
    proc = run("Testing.py", "--data", ROOT / "data" / "sample", "--method",
               f"{model_path},{other}", "--out", out)  # fmt: skip
    assert_input_error(proc, "--method", "both labelled m")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, problem",
    [
        (("--aggregate", "median"), "aggregate must be"),
        (("--refine", "sift"), "refine must be"),
    ],
)
def test_testing_with_a_setting_the_procedure_cannot_take_exits_2(images, tmp_path, flags, problem):
    files, _ = images
    proc = run("Testing.py", "--fixed", files["fixed.jpg"], "--moving", files["moving.jpg"],
               *flags, "--out", tmp_path)  # fmt: skip
    assert_input_error(proc, "net settings", problem)


# ----------------------------------------------------------------------------------------------
# Repeatability


def test_same_pair_same_model_gives_the_identical_matrix(images, model_path):
    from classical import register_sift
    from Network import load_network
    from registrar import NetRegistrar

    files, _ = images
    fixed, moving = read_image(files["fixed.jpg"]), read_image(files["moving.jpg"])
    first = NetRegistrar(load_network(model_path)).register(fixed, moving)
    again = NetRegistrar(load_network(model_path)).register(
        read_image(files["fixed.jpg"]), read_image(files["moving.jpg"])
    )
    assert first.fixed_from_moving is not None
    assert first.fixed_from_moving.model == again.fixed_from_moving.model
    np.testing.assert_array_equal(first.fixed_from_moving.matrix, again.fixed_from_moving.matrix)
    assert first.confidence == again.confidence
    sift = [register_sift(fixed, moving).fixed_from_moving for _ in range(2)]
    np.testing.assert_array_equal(sift[0].matrix, sift[1].matrix)


def test_cli_single_pair_matches_the_batch_row(batch, images, model_path, tmp_path):
    """Another process, the same pair and model: the same matrix as the batch run's."""
    proc, out, _, data = batch
    row = read_csv(out / "m" / "per_pair.csv")["S01"]
    run_pair = run("Testing.py", "--fixed", data / "Images" / "S01_1.jpg",
                   "--moving", data / "Images" / "S01_2.jpg", "--method", model_path,
                   "--out", tmp_path)  # fmt: skip
    assert run_pair.returncode == 0, run_pair.stderr[-2000:]
    m = np.array(json.loads((tmp_path / "result.json").read_text())["fixed_from_moving"])
    batch_m = np.array([[float(row[f"m{i}{j}"]) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(m, batch_m, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# DatasetCreator.py


def test_dataset_creator_skips_bad_photos_and_pairs_and_goes_on(images, big_pair, tmp_path):
    files, _ = images
    photos = tmp_path / "photos"
    photos.mkdir()
    good_photos = ["grey.png", "rgba.png", "fixed16.png", "moving640.jpg"]
    for name in good_photos + sorted(set(BAD_IMAGES) - {"missing.jpg"}):
        shutil.copy(files[name], photos / name)
    shutil.copy(big_pair[0], photos / "big8000.jpg")
    expected = fire_folder(tmp_path / "fire", images)
    for index in (1, 2):  # and points that cannot define an affine (collinear)
        shutil.copy(files["fixed.jpg"], tmp_path / "fire" / "Images" / f"A06_{index}.jpg")
    write_points(tmp_path / "fire" / "Ground Truth" / "control_points_A06_1_2.txt",
                 [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])  # fmt: skip
    expected["A06"] = ("control_points_A06_1_2.txt", "collinear")
    out = tmp_path / "patches"
    small = ["--pairs-per-photo", "1", "--samples-per-pair", "2", "--pairs-per-shard", "4",
             "--patch-size", "64", "--synth-size", "256", "--fine-size-min", "128",
             "--fine-size-max", "160"]  # fmt: skip
    proc = run("DatasetCreator.py", "--photos", photos, "--fire", tmp_path / "fire",
               "--retina", "false", "--out", out, *small)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    failed = {f["source"]: f["reason"] for f in manifest["failed"]}
    for name in set(BAD_IMAGES) - {"missing.jpg"}:
        reason = failed[str(photos / name)]
        assert any(word in reason for word in BAD_IMAGES[name]), reason
    for pair, want in expected.items():
        if want is None:
            assert f"fire/{pair}" in manifest["sources"]
        else:
            reason = failed[f"fire/{pair}"]
            assert want[0] in reason and want[1] in reason, reason
    fire = {"fire/S01", "fire/S02", "fire/P01"}
    assert set(manifest["sources"]) == set(good_photos) | {"big8000.jpg"} | fire
    check_shards(out, manifest)


def test_dataset_creator_with_a_missing_photo_folder_exits_2(tmp_path):
    proc = run("DatasetCreator.py", "--photos", tmp_path / "nowhere", "--retina", "false",
               "--out", tmp_path / "out")  # fmt: skip
    assert_input_error(proc, tmp_path / "nowhere", "not found")


def create_in_process(*argv):
    """DatasetCreator.py's main in this process (no second TensorFlow start-up)."""
    import DatasetCreator
    from common import cli

    DatasetCreator.main(cli(vars(DatasetCreator), "", [str(a) for a in argv]))


def check_shards(out, manifest=None):
    """Every ``*-x.npy`` present loads with its ``-y.npy`` of the same length; every shard the
    manifest lists is present with its count. Returns {name: (x, y)}."""
    shards = {}
    for x_path in sorted(out.glob("*-x.npy")):
        name = x_path.name[: -len("-x.npy")]
        x = np.load(x_path)
        y = np.load(out / f"{name}-y.npy")
        assert len(x) == len(y) > 0 and x.dtype == np.uint8 and y.shape[1:] == (2, 3)
        shards[name] = (x, y)
    for shard in (manifest or {}).get("shards", []):
        assert shard["name"] in shards, shard
        assert len(shards[shard["name"]][0]) == shard["count"], shard
    return shards


def test_dataset_creator_killed_midway_leaves_no_false_shard_and_rerun_finishes(tmp_path):
    """SIGKILL as soon as a shard is written, over the output of an earlier run with another
    seed; then rerun. Nothing half-written or stale is ever listed, and the resumed result is
    byte-identical to an uninterrupted run with the same seed (repeatability)."""
    common = ["--retina", "true", "--samples-per-pair", "4", "--pairs-per-shard", "2",
              "--patch-size", "64", "--synth-size", "512"]  # fmt: skip
    full = [*common, "--pairs-per-photo", "16", "--seed", "0"]  # 8 shards
    out, fresh = tmp_path / "patches", tmp_path / "fresh"
    create_in_process(*common, "--pairs-per-photo", "2", "--seed", "1", "--out", out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*-x.npy")}
    proc = start("DatasetCreator.py", *full, "--out", out, log=tmp_path / "log")

    def new_shard_written():
        for path in out.glob("*-x.npy"):
            try:
                if path.stat().st_mtime_ns != before.get(path):
                    return True
            except FileNotFoundError:  # being replaced
                pass
        return False

    kill_when(proc, new_shard_written)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["SEED"] == 0  # the earlier run's list is never left over new shards
    assert len(manifest["shards"]) < 8  # really interrupted
    check_shards(out, manifest)
    rerun = run("DatasetCreator.py", *full, "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(s["name"] for s in manifest["shards"]) == [f"train-{k:04d}" for k in range(8)]
    resumed = check_shards(out, manifest)
    create_in_process(*full, "--out", fresh)  # the same seed, uninterrupted
    expected = check_shards(fresh, json.loads((fresh / "manifest.json").read_text()))
    assert resumed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name][0], expected[name][0])
        np.testing.assert_array_equal(resumed[name][1], expected[name][1])


# ----------------------------------------------------------------------------------------------
# NetworkTrainer.py


def write_tiny_shards(out, size=32):
    """Two train shards and one val shard of random patch pairs, and their manifest."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for name, split, count in (("train-0000", "train", 48), ("train-0001", "train", 48),
                               ("val-0000", "val", 16)):  # fmt: skip
        x = rng.integers(0, 256, (count, size, size, 2), dtype=np.uint8)
        y = np.tile(np.eye(2, 3, dtype=np.float32), (count, 1, 1))
        y[:, :, 2] = rng.uniform(-0.1, 0.1, (count, 2))
        np.save(out / f"{name}-x.npy", x)
        np.save(out / f"{name}-y.npy", y)
        shards.append({"name": name, "split": split, "count": count})
    (out / "manifest.json").write_text(json.dumps({"shards": shards, "config": {}}))
    return out


def test_trainer_with_missing_data_exits_2(tmp_path):
    proc = run("NetworkTrainer.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "m.keras",
               "--run-dir", tmp_path / "run")  # fmt: skip
    assert_input_error(proc, tmp_path / "nowhere", "no manifest")


@pytest.mark.parametrize("script", ["NetworkTrainer.py", "Testing.py"])
def test_a_bad_input_is_one_line_in_a_shell_that_does_not_quiet_tensorflow(tmp_path, script):
    """The scripts that load TensorFlow keep its start-up log (CPU features, absl) off stderr by
    themselves: in a user's shell, without TF_CPP_MIN_LOG_LEVEL, a bad input is still ONE line
    (found after TensorFlow has loaded: missing training data, a model that is not one)."""
    bad, problem = tmp_path / "nowhere", "no manifest"
    args = ["--data", bad, "--out", tmp_path / "m.keras", "--run-dir", tmp_path]
    if script == "Testing.py":
        bad, problem = tmp_path / "junk.keras", "not a keras model"
        bad.write_bytes(b"not a zip archive")
        args = ["--data", "data/sample", "--model", bad, "--out", tmp_path]
    proc = run(script, *args, env={k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert_input_error(proc, bad, problem)
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_no_tensorflow_notice_on_stderr_where_onednn_is_on(tmp_path):
    """Where TensorFlow turns its oneDNN kernels on (by itself on Intel CPUs with AVX-512; forced
    here with TF_ENABLE_ONEDNN_OPTS=1, so that every CPU shows it), it writes a notice on stderr
    that no log level silences, and LiteRT one more on its CPU delegate: in a user's shell the
    single-pair command, which loads both, writes nothing on stderr at all."""
    env = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    images = ROOT / "data" / "sample" / "Images"
    proc = run("Testing.py", "--fixed", images / "S01_1.jpg", "--moving", images / "S01_2.jpg",
               "--out", tmp_path, env={**env, "TF_ENABLE_ONEDNN_OPTS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "fixed_from_moving" in proc.stdout


def test_an_unknown_transform_is_one_line_for_every_method(tmp_path):
    """--transform takes affine or quadratic: anything else is refused before any work, in one
    line, whichever method is asked (the classical ones would otherwise fit an affine)."""
    images = ROOT / "data" / "sample" / "Images"
    for method in ("sift", "net"):
        proc = run("Testing.py", "--fixed", images / "S01_1.jpg", "--moving", images / "S01_2.jpg",
                   "--method", method, "--transform", "cubic", "--out", tmp_path)  # fmt: skip
        assert_input_error(proc, "--transform", "affine or quadratic")
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_a_training_run_writes_nothing_on_stderr(tmp_path):
    """The trainer, in a user's shell where oneDNN is on (forced here, as on Intel CPUs with
    AVX-512): neither TensorFlow's start-up notices nor Keras' warnings (a validation set that
    "ran out of data" after each epoch, a shuffle it cannot do) reach stderr."""
    data = write_tiny_shards(tmp_path / "data")
    env = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = run("NetworkTrainer.py", "--data", data, "--out", tmp_path / "m.keras", "--run-dir",
               tmp_path / "run", "--net-widths", "8,8,8,8,8", "--net-head-width", "16",
               "--batch-size", "8", "--epochs", "2", "--steps-per-epoch", "3", "--threads", "1",
               env={**env, "TF_ENABLE_ONEDNN_OPTS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert "saved" in proc.stdout


def test_quiet_native_log_holds_only_the_notices(capfd, monkeypatch):
    """What native code writes on file descriptor 2 comes out after the block, less the notices
    below TF_CPP_MIN_LOG_LEVEL: an error line, and Python's own output, are kept."""
    from common import quiet_native_log

    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796503562.687052    2167 port.cc:153] oneDNN custom operations are on.\n",
        "W0000 00:00:1796503564.830621    2167 helpers.cc:364] Ignored output_format.\n",
        "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
        "E0000 00:00:1796503564.830621    2167 loader.cc:12] something real went wrong\n",
        "a line of Python's own\n",
    ]
    for level, kept in (("2", lines[4:]), ("1", lines[2:3] + lines[4:]), ("0", lines)):
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
        with quiet_native_log():
            for line in lines:
                os.write(2, line.encode())
        assert capfd.readouterr().err == "".join(kept), level


def test_trainer_refuses_a_manifest_whose_shard_is_missing(tmp_path):
    from NetworkTrainer import read_manifest

    data = write_tiny_shards(tmp_path / "data")
    read_manifest(data)
    (data / "train-0001-y.npy").unlink()
    with pytest.raises(InputError) as caught:
        read_manifest(data)
    assert str(data / "train-0001-y.npy") in str(caught.value) and "missing" in str(caught.value)


def test_trainer_killed_mid_epoch_resumes_and_ends_with_the_same_epochs(tmp_path):
    """SIGKILL during epoch 1 (its backup of epoch 0 is on disk), as if the kill also came just
    after epoch 1's history row but before its backup (a row the rerun must not duplicate);
    rerun the same command: epochs 0, 1, 2 exactly once, a model that loads."""
    from Network import load_network

    data = write_tiny_shards(tmp_path / "data")
    run_dir, out = tmp_path / "run", tmp_path / "model.keras"
    args = ["--data", data, "--out", out, "--run-dir", run_dir, "--net-widths", "8,8,8,8,8",
            "--net-head-width", "16", "--batch-size", "8", "--epochs", "3",
            "--steps-per-epoch", "10", "--threads", "1"]  # fmt: skip
    proc = start("NetworkTrainer.py", *args, log=tmp_path / "log1")
    metadata = run_dir / "backup" / "training_metadata.json"
    kill_when(proc, metadata.exists, timeout=240)
    assert not out.exists()
    history = run_dir / "history.csv"
    rows = history.read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0"], rows
    with open(history, "a") as f:  # the row of an epoch whose backup never happened
        f.write("1" + rows[1][1:] + "\n")
    rerun = run("NetworkTrainer.py", *args, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "Epoch 1/3" not in rerun.stdout and "Epoch 2/3" in rerun.stdout  # really resumed
    epochs = [int(r.split(",")[0]) for r in history.read_text().splitlines()[1:]]
    assert epochs == [0, 1, 2]
    model = load_network(out)
    assert model.input_shape == (None, 32, 32, 2)
    assert json.loads(out.with_suffix(".json").read_text())["epochs"] == 3
    assert not (run_dir / "backup").exists()
    assert not list(run_dir.glob("*.part*")) and not list(out.parent.glob("*.part"))


def test_trainer_history_is_trimmed_to_where_the_backup_resumes(tmp_path):
    """What the rerun does before fit: rows of epochs the backup does not cover are dropped (they
    are trained again), a fresh start drops the old history, a damaged backup is a clear error."""
    from NetworkTrainer import resume_epoch, trim_history

    backup, history = tmp_path / "backup", tmp_path / "history.csv"
    assert resume_epoch(backup) == 0
    backup.mkdir()
    (backup / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    assert resume_epoch(backup) == 2
    history.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    trim_history(history, 2)
    assert history.read_text() == "epoch,loss\n0,1.0\n1,0.9\n"
    trim_history(history, 0)
    assert not history.exists()
    (backup / "training_metadata.json").write_text('{"epo')  # killed while writing it
    with pytest.raises(InputError) as caught:
        resume_epoch(backup)
    assert "training_metadata.json" in str(caught.value) and "damaged" in str(caught.value)
