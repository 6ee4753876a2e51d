"""The four steps end to end on retina-made data: shards, a tiny training run, registration."""

import json

import cv2
import numpy as np
import pytest

import DatasetCreator
import NetworkTrainer
from common import cli, norm_from_pixels, to3x3


def ncc(a, b):
    keep = (a > 8) & (b > 8)
    a, b = a[keep].astype(float), b[keep].astype(float)
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("patches")
    argv = ["--out", str(out), "--pairs-per-photo", "6", "--samples-per-pair", "8"]
    argv += ["--pairs-per-shard", "2", "--val-fraction", "0.5", "--synth-size", "512"]
    DatasetCreator.main(cli(vars(DatasetCreator), "", argv))
    return out, argv


def test_shards_and_manifest_read_back(shards):
    out, _ = shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["patch_size"] == DatasetCreator.PATCH_SIZE
    assert {s["split"] for s in manifest["shards"]} == {"train"}  # one photo: no validation
    total = 0
    for shard in manifest["shards"]:
        x = np.load(out / f"{shard['name']}-x.npy", mmap_mode="r")
        y = np.load(out / f"{shard['name']}-y.npy", mmap_mode="r")
        p = DatasetCreator.PATCH_SIZE
        assert x.dtype == np.uint8 and x.shape[1:] == (p, p, 2)
        assert y.dtype == np.float32 and y.shape == (len(x), 2, 3) == (shard["count"], 2, 3)
        total += len(x)
    assert total == 6 * 8
    assert not list(out.glob("*.part"))


def test_targets_align_the_patches(shards):
    """Warping each moving patch by its target (back in pixels) lines it up with the fixed one,
    better than the patch as it is, and better than the target shifted by 3 px."""
    out, _ = shards
    x = np.load(out / "train-0000-x.npy")
    y = np.load(out / "train-0000-y.npy")
    p = x.shape[1]
    n = norm_from_pixels(p)
    before, after, wrong = [], [], []
    for patches, target in zip(x, y):
        fixed, moving = patches[..., 0], patches[..., 1]
        pixels = np.linalg.inv(n) @ to3x3(target) @ n
        before.append(ncc(fixed, moving))
        after.append(ncc(fixed, cv2.warpAffine(moving, pixels[:2], (p, p))))
        off = pixels + [[0, 0, 3], [0, 0, -3], [0, 0, 0]]
        wrong.append(ncc(fixed, cv2.warpAffine(moving, off[:2], (p, p))))
    assert np.median(after) > np.median(before) + 0.1
    assert np.mean(np.array(after) > np.array(wrong)) > 0.9


def test_the_training_pipeline_flips_patches_and_targets_together(shards):
    """What NetworkTrainer feeds Keras: every pair of the shards once an epoch, in a new order
    each epoch, some flipped, and each still aligned by its target (a flip of the patches
    without the matching flip of the matrix would misalign it)."""
    out, _ = shards
    names = sorted(p.name[: -len("-x.npy")] for p in out.glob("*-x.npy"))
    listed = [{"name": name} for name in names]
    ds, size = NetworkTrainer.make_dataset(out, listed, 8, 0, True)
    stored = np.concatenate([np.load(out / f"{name}-x.npy") for name in names])
    n = norm_from_pixels(size)
    orders = []
    for _ in range(2):  # two epochs
        flipped, aligned, order = 0, [], []
        for x, targets in ds:
            for patches, target in zip(x.numpy().astype(np.uint8), targets["matrix"].numpy()):
                fixed, moving = patches[..., 0], patches[..., 1]
                same = np.flatnonzero((stored == patches).all(axis=(1, 2, 3)))
                order.append(int(same[0]) if len(same) else -1)
                flipped += len(same) == 0
                pixels = np.linalg.inv(n) @ to3x3(target) @ n
                off = pixels + [[0, 0, 3], [0, 0, -3], [0, 0, 0]]
                right, wrong = (cv2.warpAffine(moving, m[:2], (size, size)) for m in (pixels, off))
                aligned.append(ncc(fixed, right) > ncc(fixed, wrong))
        assert len(order) == len(stored)
        unflipped = [k for k in order if k >= 0]
        assert len(set(unflipped)) == len(unflipped)  # no pair twice
        assert 0.2 * len(stored) < flipped < 0.95 * len(stored)  # 3 in 4 flipped one way or both
        assert np.mean(aligned) > 0.9
        orders.append(order)
    assert orders[0] != orders[1]


def test_rerun_skips_finished_shards(shards):
    out, argv = shards
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    DatasetCreator.main(cli(vars(DatasetCreator), "", argv))
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}


def test_tiny_training_run_loss_falls_and_model_loads(shards, tmp_path):
    from Network import load_network

    out, _ = shards
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][-1]["split"] = "val"  # one retina photo only: borrow a shard to validate
    (out / "manifest.json").write_text(json.dumps(manifest))
    model_path = tmp_path / "tiny.keras"
    argv = ["--data", str(out), "--out", str(model_path), "--run-dir", str(tmp_path / "run")]
    argv += ["--epochs", "5", "--steps-per-epoch", "15", "--batch-size", "8"]
    argv += ["--net-widths", "8,8,16,16,16"]
    argv += ["--net-head-width", "32", "--learning-rate", "0.003"]
    NetworkTrainer.main(cli(vars(NetworkTrainer), "", argv))
    history = np.genfromtxt(tmp_path / "run" / "history.csv", delimiter=",", names=True)
    assert list(history["epoch"]) == list(range(5))
    assert history["loss"][-1] < 0.85 * history["loss"][0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model = load_network(model_path)
    assert set(model.output_names) >= {"translation", "scale", "rotation", "matrix"}
    info = json.loads(model_path.with_suffix(".json").read_text())
    assert info["parameters"] == model.count_params()
