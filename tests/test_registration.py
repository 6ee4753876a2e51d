"""The shipped model registers new retina-made pairs with a known motion; settings stay in step."""

import csv
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import DatasetCreator
import registrar
import Testing
from common import cli

MODEL = "models/fundusreg.keras"
# Bounds on the FIRE error (px, 768-px images) of the generated pairs with the shipped model: each
# pair, and their median. Measured: 0.53 to 1.03 px (median 0.61; 0.48 to 0.84 px, median 0.61,
# with --zoom-at-overlap false; 0.41 to 1.53 px, median 0.68, also with --weighted false; SIFT
# fails P01 and has a median of 0.98 px). The pairs carry a smooth non-affine distortion, so even
# the best affine leaves some error.
MAX_ERROR_PX = 3.0
MAX_MEDIAN_PX = 1.0


def test_testing_defaults_are_the_registrars():
    """Testing.py has a flag for every setting of NetRegistrar, with the registrar's default."""
    taken = list(inspect.signature(registrar.NetRegistrar).parameters)[1:]  # after the model
    assert sorted(name.lower() for name in Testing.NET_SETTINGS) == sorted(taken)
    for name in Testing.NET_SETTINGS:
        assert getattr(Testing, name) == getattr(registrar, name), name


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Six new pairs (S, P, A twice) from skimage.data.retina(), another seed than data/sample."""
    root = tmp_path_factory.mktemp("fire")
    argv = [
        "--write-sample",
        str(root),
        "--sample-pairs",
        "6",
        "--seed",
        "7",
        "--synth-size",
        "768",
        "--max-shift",
        "0.35",  # P pairs: up to 35 % of the side (the default 45 % goes past SIFT too)
    ]
    DatasetCreator.main(cli(vars(DatasetCreator), "", argv))
    return root


def test_shipped_model_recovers_known_motions(generated, root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "Testing.py", "--data", str(generated), "--method", "net"]
    command += ["--model", MODEL, "--out", str(out), "--figures", "false"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "per_pair.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    errors = {r["pair"]: float(r["error_px"]) for r in rows}
    assert max(errors.values()) < MAX_ERROR_PX, errors
    assert np.median(list(errors.values())) < MAX_MEDIAN_PX, errors
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["inaccurate"] == 0
    assert summary["mAUC"] > 0.9
    assert all(0.5 <= float(r["confidence"]) <= 1 for r in rows)  # good results, and sure of it
    assert summary["bad"] == summary["low_confidence"] == 0
    # the matrix in per_pair.csv is the one that gives that error
    from common import fire_error, read_fire

    pairs = {p.pair: p for p in read_fire(generated)}
    for r in rows:
        m = np.array([[float(r[f"m{i}{j}"]) for j in range(3)] for i in range(2)])
        assert fire_error(m, pairs[r["pair"]].points) == pytest.approx(errors[r["pair"]], abs=1e-3)


def test_network_script_reports_size_and_time(root):
    command = [sys.executable, "Network.py", "--time-patches", "8"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parameters:" in done.stdout and "ms" in done.stdout


def test_the_runtime_gives_the_models_own_matrices(monkeypatch):
    """Registration runs the network with LiteRT (Network.matrix_function), or with TensorFlow's
    own copy of it where LiteRT has no wheel: both give Keras' matrices, for one input and for a
    batch (each batch size has its interpreter)."""
    import Network

    model = Network.load_network(MODEL)
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 2)).astype(np.float32)
    expected = model(x, training=False)["matrix"].numpy()
    batches = (x[:1], x, x[:1])
    litert = Network.matrix_function(model)
    results = [litert(batch) for batch in batches]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # as if not installed
    with pytest.warns(UserWarning, match="deprecated"):  # TensorFlow's copy says so
        fallback = Network.matrix_function.__wrapped__(model)
        results += [fallback(batch) for batch in batches]
    for batch, result in zip(batches * 2, results):
        np.testing.assert_allclose(result, expected[: len(batch)], atol=1e-5)


def test_the_runtime_gives_keras_numbers_where_litert_gives_nan():
    """An untrained network on a blank input: LiteRT's L2 normalisation (no epsilon) gives NaN,
    Keras the identity (its heads start there); matrix_function returns Keras' numbers for those
    inputs, LiteRT's for the others."""
    import Network

    model = Network.build_network(64, "8,8,8,8,8", 16)
    x = np.zeros((3, 64, 64, 2), np.float32)
    x[1] = np.random.default_rng(0).uniform(0, 255, (64, 64, 2))
    expected = model(x, training=False)["matrix"].numpy()
    np.testing.assert_allclose(Network.matrix_function(model)(x), expected, atol=1e-5)


def test_jitter_adds_reproducible_noise_to_the_network_and_none_by_default():
    """--jitter (a measurement of chance): each translation the network predicts moves by noise of
    about that size, the same for the same seed; the default adds none."""
    from Network import load_network

    model = load_network(MODEL)
    rng = np.random.default_rng(0)
    fixed, moving = rng.integers(0, 255, (2, 8, 64, 64), dtype=np.uint8)
    plain = registrar.NetRegistrar(model).predict(fixed, moving)
    again = registrar.NetRegistrar(model).predict(fixed, moving)
    np.testing.assert_array_equal(plain, again)
    noisy = [registrar.NetRegistrar(model, jitter=0.5, jitter_seed=s) for s in (1, 1, 2)]
    moved = [r.predict(fixed, moving) - plain for r in noisy]
    np.testing.assert_array_equal(moved[0], moved[1])  # the same seed: the same noise
    assert not np.array_equal(moved[0], moved[2])
    assert 0.2 < np.std(moved[0][:, :2, 2]) < 1.0  # about 0.5 px, translations only
    np.testing.assert_allclose(moved[0][:, :2, :2], 0, atol=1e-6)
