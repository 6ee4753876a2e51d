"""NetworkTrainer.py - step 3 of 4: train the network on DatasetCreator's shards with Keras fit.

The shards stream through tf.data a whole shard at a time (never all in memory), with random flips
of both patches (the target matrix flipped with them). Losses: one MSE per head (translation, scale,
rotation, as the prototype) weighted by HEAD_LOSS_WEIGHT, plus the corner displacement in pixels
(Network.CornerLoss). Adam with cosine decay. Callbacks: BackupAndRestore (kill it, run the same
command again, it resumes and ends at the same epoch count), ModelCheckpoint of the best
validation loss, CSV history and a loss-curve PNG after every epoch. Several GPUs -> one
MirroredStrategy replica each.

Output: OUT (a .keras model, loadable in safe mode) and OUT with .json (how it was trained); the
run folder RUN_DIR holds the backup, best checkpoint, history.csv and loss.png.

TensorFlow's oneDNN kernels are on (TF_ENABLE_ONEDNN_OPTS=1 unless set otherwise): a training step
2.4x as fast on an AMD EPYC, where TensorFlow leaves them off by itself, and TensorFlow's default
on Intel CPUs with AVX-512. Its notice that they are on is held off stderr (common.py).
"""

import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # oneDNN on (above), before TensorFlow loads
from common import import_tensorflow  # noqa: E402

import_tensorflow()  # before Keras imports it: its start-up notices held (common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402

import Network  # noqa: E402
from common import InputError, cli, exit_on_input_error, write_atomic, write_json  # noqa: E402
from Network import CornerLoss, build_network  # noqa: E402

DATA = "data/patches"
OUT = "models/fundusreg.keras"
RUN_DIR = "runs/train"
EPOCHS = 16
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
HEAD_LOSS_WEIGHT = 1000.0  # MSE of normalised matrix entries is ~1e-4 where corners move ~1 px
STEPS_PER_EPOCH = 0  # 0 = one pass over the training shards
SEED = 0
THREADS = 0  # 0 = TensorFlow's choice
# The network's shape (Network.build_network); the input size comes from the shards
NET_WIDTHS = Network.WIDTHS
NET_HEAD_WIDTH = Network.HEAD_WIDTH
NET_DROPOUT = Network.DROPOUT
NET_CORRELATION_RADIUS = Network.CORRELATION_RADIUS
NET_SIAMESE_STAGES = Network.SIAMESE_STAGES


def read_manifest(data):
    path = Path(data) / "manifest.json"
    if not path.exists():
        raise InputError(path, "no manifest: run DatasetCreator.py first")
    try:
        manifest = json.loads(path.read_text())
        shards = {
            s: [sh for sh in manifest["shards"] if sh["split"] == s] for s in ("train", "val")
        }
    except (ValueError, KeyError, TypeError):
        raise InputError(path, "not a DatasetCreator manifest") from None
    for split, listed in shards.items():
        if not listed:
            raise InputError(path, f"lists no {split} shards")
        for shard in listed:
            for suffix in ("x", "y"):
                array = Path(data) / f"{shard.get('name')}-{suffix}.npy"
                if not array.is_file():
                    raise InputError(array, "shard listed in the manifest is missing")
    return manifest, shards


def flip(x, y, horizontal, vertical):
    """Flip (N, P, P, 2) patch pairs and their normalised (N, 2, 3) targets together, each pair
    where its ``horizontal`` / ``vertical`` (N,) flag says: F A F, F = diag(+-1, +-1, 1), whose
    entry (r, c) is A's times the signs of row r and column c (float32 targets stay float32)."""
    x = x.copy()
    x[horizontal] = x[horizontal][:, :, ::-1]
    x[vertical] = x[vertical][:, ::-1]
    signs = np.ones((len(y), 3), np.float32)
    signs[horizontal, 0], signs[vertical, 1] = -1.0, -1.0
    return x, y * signs[:, :2, None] * signs[:, None, :]


def make_dataset(data, shards, batch_size, seed, train):
    """tf.data pipeline over the shards -> (x float32, targets dict of the 4 outputs). Python
    reads one whole shard at a time (``tf.numpy_function``; for training the shards in a new
    order each epoch, each one's pairs permuted and flipped at random), so only a few shards are
    in memory. Not one pair at a time through ``from_generator``, as before: its Python thread
    contended with Keras' training step on 2 cores, and a step took 600-680 ms instead of 513 ms
    (as much system time as user time)."""
    import tensorflow as tf

    reads = itertools.count()  # every read of a shard its own permutation and flips

    def load(k):
        xs = np.load(Path(data) / f"{shards[k]['name']}-x.npy")
        ys = np.load(Path(data) / f"{shards[k]['name']}-y.npy").astype(np.float32, copy=False)
        if train:
            rng = np.random.default_rng([seed, next(reads)])
            pick = rng.permutation(len(xs))
            xs, ys = flip(xs[pick], ys[pick], *(rng.uniform(size=(2, len(xs))) < 0.5))
        return xs, ys

    size = np.load(Path(data) / f"{shards[0]['name']}-x.npy", mmap_mode="r").shape[1]

    def pairs(k):
        xs, ys = tf.numpy_function(load, [k], (tf.uint8, tf.float32))
        xs.set_shape((None, size, size, 2))
        ys.set_shape((None, 2, 3))
        return tf.data.Dataset.from_tensor_slices((xs, ys))

    ds = tf.data.Dataset.range(len(shards))
    if train:
        ds = ds.shuffle(len(shards), seed=seed)  # a new order each epoch
    ds = ds.flat_map(pairs)
    if train:
        ds = ds.shuffle(4096, seed=seed)

    def targets(x, y):
        return tf.cast(x, tf.float32), {
            "translation": y[:, :, 2],
            "scale": tf.stack([y[:, 0, 0], y[:, 1, 1]], -1),
            "rotation": tf.stack([y[:, 0, 1], y[:, 1, 0]], -1),
            "matrix": y,
        }

    return ds.batch(batch_size).map(targets).prefetch(2), size


class LossPlot(keras.callbacks.Callback):
    """Redraw the loss-curve PNG from the CSV history after every epoch (survives interruption)."""

    def __init__(self, history_csv, png):
        super().__init__()
        self.history_csv, self.png = history_csv, png

    def on_epoch_end(self, epoch, logs=None):
        plot_history(self.history_csv, self.png)


def plot_history(history_csv, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(history_csv).exists():
        return
    rows = np.genfromtxt(history_csv, delimiter=",", names=True)
    if rows.size < 1:
        return
    rows = np.atleast_1d(rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, axis in (("loss", ax[0]), ("matrix_loss", ax[1])):
        for prefix in ("", "val_"):
            if prefix + name in rows.dtype.names:
                axis.plot(rows["epoch"] + 1, rows[prefix + name], label=prefix + name)
        axis.set_xlabel("epoch")
        axis.legend()
    ax[0].set_title("total loss")
    ax[1].set_title("corner displacement (px of a patch)")
    ax[0].set_yscale("log")
    fig.tight_layout()
    tmp = Path(png).with_suffix(".part.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


class AtomicCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves to ``<name>.part.keras`` then renames: a kill while it saves
    never leaves a half-written best model that the final copy to OUT would trust."""

    def __init__(self, filepath, **kwargs):
        self.final = Path(filepath)
        part = self.final.with_name(self.final.stem + ".part.keras")
        part.unlink(missing_ok=True)  # a leftover of a killed run is never renamed into place
        super().__init__(str(part), **kwargs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if Path(self.filepath).exists():
            Path(self.filepath).replace(self.final)


def resume_epoch(backup):
    """The epoch at which BackupAndRestore's backup in ``backup`` resumes (0: none)."""
    path = Path(backup) / "training_metadata.json"
    if not path.exists():
        return 0
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):
        raise InputError(path, "training backup is damaged: delete it to start again") from None


def trim_history(history_csv, epoch):
    """Keep only history rows of epochs before ``epoch``, where training resumes: the rows of an
    epoch whose backup a kill prevented are written again, so each epoch appears once."""
    path = Path(history_csv)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    epochs = [row.split(",")[0] for row in lines[1:]]
    kept = [row for row, e in zip(lines[1:], epochs, strict=True) if e.isdigit() and int(e) < epoch]
    if not kept:
        path.unlink()  # a fresh start: a new header (the columns may differ)
    elif len(kept) < len(lines) - 1:
        write_atomic(path, "".join(lines[:1] + kept))


def best_so_far(history_csv):
    """Best validation loss in an existing history (so a resumed run keeps the real best)."""
    if not Path(history_csv).exists():
        return None
    rows = np.atleast_1d(np.genfromtxt(history_csv, delimiter=",", names=True))
    if rows.size == 0 or "val_loss" not in (rows.dtype.names or ()):
        return None
    return float(np.nanmin(rows["val_loss"]))


def export_model(checkpoint, out):
    """The best checkpoint without its optimizer state (a third of the size), written atomically:
    what Testing.py loads (safe mode, no compile)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = keras.saving.load_model(checkpoint, compile=False, safe_mode=True)
    tmp = out.with_name(out.stem + ".part.keras")
    model.save(tmp)
    tmp.replace(out)


def main(args):
    import tensorflow as tf

    if args.THREADS:
        tf.config.threading.set_intra_op_parallelism_threads(args.THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(args.THREADS)
    keras.utils.set_random_seed(args.SEED)
    manifest, shards = read_manifest(args.DATA)
    train, size = make_dataset(args.DATA, shards["train"], args.BATCH_SIZE, args.SEED, True)
    val, _ = make_dataset(args.DATA, shards["val"], args.BATCH_SIZE, args.SEED, False)
    n_train = sum(s["count"] for s in shards["train"])
    n_val = sum(s["count"] for s in shards["val"])
    steps = args.STEPS_PER_EPOCH or max(1, n_train // args.BATCH_SIZE)
    run = Path(args.RUN_DIR)
    run.mkdir(parents=True, exist_ok=True)
    gpus = tf.config.list_logical_devices("GPU")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        model = build_network(
            size,
            args.NET_WIDTHS,
            args.NET_HEAD_WIDTH,
            args.NET_DROPOUT,
            args.NET_CORRELATION_RADIUS,
            args.NET_SIAMESE_STAGES,
        )
        schedule = keras.optimizers.schedules.CosineDecay(
            args.LEARNING_RATE, args.EPOCHS * steps, alpha=0.02
        )
        heads = ("translation", "scale", "rotation")
        model.compile(
            optimizer=keras.optimizers.Adam(schedule),
            loss={**{h: "mse" for h in heads}, "matrix": CornerLoss(size / 2)},
            loss_weights={**{h: args.HEAD_LOSS_WEIGHT for h in heads}, "matrix": 1.0},
        )
    print(
        f"{model.count_params():,} parameters; {n_train} training patch pairs, "
        f"{steps} steps per epoch"
    )
    history_csv, best = run / "history.csv", run / "best.keras"
    start_epoch = resume_epoch(run / "backup")
    trim_history(history_csv, start_epoch)
    if start_epoch == 0:  # a fresh start: an earlier run's best model must not end up in OUT
        best.unlink(missing_ok=True)
    # The backup comes LAST: an epoch's history row and checkpoint are on disk before the backup
    # that skips it on resume (a kill in between reruns the epoch; trim_history drops its row).
    callbacks = [
        keras.callbacks.CSVLogger(str(history_csv), append=True),
        AtomicCheckpoint(
            str(best),
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=best_so_far(history_csv),
        ),
        keras.callbacks.TerminateOnNaN(),
        LossPlot(history_csv, run / "loss.png"),
        keras.callbacks.BackupAndRestore(
            str(run / "backup"), save_freq="epoch", double_checkpoint=True
        ),
    ]
    start = time.perf_counter()
    model.fit(
        train.repeat(),
        epochs=args.EPOCHS,
        steps_per_epoch=steps,
        # the validation batches, one pass an epoch: counted, so that Keras does not warn that
        # the data ran out at the end of each pass (it does for a dataset of unknown length)
        validation_data=val.repeat(),
        validation_steps=-(-n_val // args.BATCH_SIZE),
        shuffle=False,  # tf.data shuffles (make_dataset); Keras warns that it cannot
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    seconds = time.perf_counter() - start
    if not best.exists():
        raise InputError(best, "training produced no checkpoint (no finite validation loss)")
    out = Path(args.OUT)
    export_model(best, out)
    write_json(
        out.with_suffix(".json"),
        {
            "model": out.name,
            "parameters": model.count_params(),
            "input_size": size,
            "best_val_loss": best_so_far(history_csv),
            "epochs": args.EPOCHS,
            "fit_seconds_this_run": round(seconds, 1),
            "threads": args.THREADS or "tensorflow default",
            "TF_ENABLE_ONEDNN_OPTS": os.environ["TF_ENABLE_ONEDNN_OPTS"],
            "trainer_settings": vars(args),
            "dataset": manifest.get("config"),
            "dataset_command": manifest.get("command"),
            "dataset_seconds": manifest.get("seconds"),
            "command": shlex.join(["python", *sys.argv]),
        },
    )
    print(
        f"saved {out} (best validation loss {best_so_far(history_csv):.4f}); "
        f"fit took {seconds:.0f} s"
    )


if __name__ == "__main__":
    exit_on_input_error(lambda: main(cli(globals(), __doc__)))
