"""Network.py - step 2 of 4: the registration network.

The prototype's STN-like localisation network, made light and made to match: a siamese encoder
(the same convolutions over the fixed and the moving patch, to 1/4 resolution), a global cost
volume (every fixed cell against every moving cell) read out by a soft-argmax into each cell's
displacement, more convolutions, and the prototype's three PARALLEL heads, translation (a02, a12),
scale (a00, a11) and rotation (a01, a10), starting at the identity; a fourth output, ``matrix``,
assembles them. CORRELATION_RADIUS = 0 is the prototype's early fusion (two stacked channels).

Convention: ``matrix`` is ``fixedpatch_from_movingpatch`` in NORMALISED patch coordinates (pixel
centres mapped to [-1, 1] by ``common.norm_from_pixels(size)``: the identity whatever the size).
registrar.py turns it into ``fixed_from_moving`` in the caller's pixels and runs it in LiteRT
(``matrix_function``). ``python Network.py`` prints the parameter count and the CPU time per patch.
"""

import functools
import os
import time

import numpy as np

from common import InputError, cli, exit_on_input_error, import_tensorflow, quiet_native_log

import_tensorflow()  # before Keras imports it: its start-up notices held (common.py)
import keras  # noqa: E402

# Architecture (the defaults of build_network)
INPUT_SIZE = 64  # patch side in pixels (the coarse pass sees the whole image at this size)
WIDTHS = "16,32,48,64"  # channels of the encoder's stride-2 stages (comma separated)
HEAD_WIDTH = 128  # units of each head's two hidden layers
DROPOUT = 0.2
CORRELATION_RADIUS = -1  # 0: stacked patches (prototype); r > 0: siamese encoder + cost volume
# of displacements up to r cells; -1: siamese encoder + global (all pairs) cost volume
SIAMESE_STAGES = 2  # with a cost volume: encoder stages shared by both patches before it
THREADS = 2
# `python Network.py`: time this many patches
TIME_PATCHES = 200


# ----------------------------------------------------------------------------------------------
# The network


@keras.saving.register_keras_serializable(package="fundusreg")
class AffineFromHeads(keras.layers.Layer):
    """(translation, scale, rotation), each (B, 2) -> (B, 2, 3) [[a00 a01 a02], [a10 a11 a12]]."""

    def call(self, translation, scale, rotation):
        ops = keras.ops
        row0 = ops.stack([scale[:, 0], rotation[:, 0], translation[:, 0]], axis=-1)
        row1 = ops.stack([rotation[:, 1], scale[:, 1], translation[:, 1]], axis=-1)
        return ops.stack([row0, row1], axis=1)


@keras.saving.register_keras_serializable(package="fundusreg")
class CornerLoss(keras.losses.Loss):
    """Mean displacement of the 4 patch corners between the true and the predicted normalised
    matrices, in pixels of a patch of side ``2 * half_size``: what registration cares about."""

    def __init__(self, half_size=INPUT_SIZE / 2, name="corner_px", **kwargs):
        super().__init__(name=name, **kwargs)
        self.half_size = float(half_size)

    def call(self, y_true, y_pred):
        ops = keras.ops
        corners = ops.convert_to_tensor(
            [[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
        )
        diff = ops.einsum(
            "bij,kj->bki", ops.cast(y_pred, "float32") - ops.cast(y_true, "float32"), corners
        )
        return (
            ops.mean(ops.sqrt(ops.sum(ops.square(diff), axis=-1) + 1e-12), axis=-1) * self.half_size
        )

    def get_config(self):
        return {**super().get_config(), "half_size": self.half_size}


def _head(features, name, bias, head_width, dropout):
    """FC -> Dropout -> FC -> FC 2, the prototype's head. Leaky ReLU, not ReLU: with the last layer
    starting at zero, plain ReLU heads died early in training here (the rotation head's units all
    went negative and it kept predicting 0 for every pair)."""
    x = keras.layers.Dense(head_width, activation="leaky_relu", name=f"{name}_fc1")(features)
    x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Dense(head_width, activation="leaky_relu", name=f"{name}_fc2")(x)
    return keras.layers.Dense(
        2,
        name=name,
        kernel_initializer="zeros",  # identity transform at the start (the prototype's init)
        bias_initializer=keras.initializers.Constant(bias),
    )(x)


@keras.saving.register_keras_serializable(package="fundusreg")
class TakeChannel(keras.layers.Layer):
    """(B, H, W, C) -> (B, H, W, 1): one channel (the fixed or the moving patch)."""

    def __init__(self, index, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        return x[..., self.index : self.index + 1]

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="fundusreg")
class Correlation(keras.layers.Layer):
    """Cost volume: for every displacement (dx, dy) in [-radius, radius]^2, the mean over channels
    of fixed(x, y) * moving(x + dx, y + dy); (B, H, W, C) x2 -> (B, H, W, (2 radius + 1)^2)."""

    def __init__(self, radius, **kwargs):
        super().__init__(**kwargs)
        self.radius = int(radius)

    def call(self, fixed, moving):
        ops, r = keras.ops, self.radius
        h, w = fixed.shape[1], fixed.shape[2]
        padded = ops.pad(moving, [[0, 0], [r, r], [r, r], [0, 0]])
        costs = [
            ops.mean(fixed * padded[:, r + dy : r + dy + h, r + dx : r + dx + w, :], axis=-1)
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ]
        return ops.stack(costs, axis=-1)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius}


@keras.saving.register_keras_serializable(package="fundusreg")
class GlobalCorrelation(keras.layers.Layer):
    """All-pairs cost volume (DGC-Net's global correlation): for every fixed cell, its correlation
    with every moving cell; (B, H, W, C) x2 -> (B, H, W, H * W). One batched matrix product, so
    any displacement is seen, however large."""

    def call(self, fixed, moving):
        ops = keras.ops
        h, w, c = fixed.shape[1], fixed.shape[2], fixed.shape[3]
        f = ops.reshape(fixed, (-1, h * w, c))
        m = ops.reshape(moving, (-1, h * w, c))
        return ops.reshape(ops.matmul(f, ops.transpose(m, (0, 2, 1))), (-1, h, w, h * w))


@keras.saving.register_keras_serializable(package="fundusreg")
class SoftArgmaxFlow(keras.layers.Layer):
    """Global cost volume (B, H, W, H * W) -> displacement of every fixed cell (B, H, W, 2), in
    normalised coordinates: the softmax-weighted mean position of the moving cells it matches,
    minus its own position. A differentiable, closed-form read-out of the matches, from which an
    affine is a linear function: the heads learn it fast."""

    def __init__(self, temperature=20.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, cost):
        ops = keras.ops
        h, w = cost.shape[1], cost.shape[2]
        ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        grid = ops.convert_to_tensor(np.stack([xs, ys], -1).reshape(h * w, 2).astype("float32"))
        weights = ops.softmax(cost * self.temperature, axis=-1)
        matched = ops.reshape(
            ops.matmul(ops.reshape(weights, (-1, h * w, h * w)), grid), (-1, h, w, 2)
        )
        return matched - ops.reshape(grid, (1, h, w, 2))

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def _stage(x, width, name):
    """Conv 3x3 stride 2, then conv 3x3 stride 1, each with BatchNorm and ReLU."""
    for stride in (2, 1):
        x = keras.layers.Conv2D(width, 3, stride, "same", use_bias=False, name=f"{name}_{stride}")(
            x
        )
        x = keras.layers.BatchNormalization(name=f"{name}_bn{stride}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{stride}")(x)
    return x


def build_network(
    input_size=INPUT_SIZE,
    widths=WIDTHS,
    head_width=HEAD_WIDTH,
    dropout=DROPOUT,
    correlation=CORRELATION_RADIUS,
    siamese_stages=SIAMESE_STAGES,
):
    """Keras model: (B, input_size, input_size, 2) uint8-range floats (fixed, moving) -> dict of
    ``translation``, ``scale``, ``rotation`` (B, 2) and ``matrix`` (B, 2, 3), normalised coords.

    correlation = 0: the prototype's early fusion, one encoder over the two stacked patches.
    correlation = r > 0: one shared (siamese) encoder of the first ``siamese_stages`` stages
    over each patch, a cost volume of displacements up to r feature cells (r * 2^stages px),
    then the other stages. correlation < 0: the same with a global (all pairs) cost volume."""
    widths = [int(w) for w in str(widths).split(",")]
    inputs = keras.Input((input_size, input_size, 2), name="fixed_moving")
    x = keras.layers.Rescaling(1 / 255.0, name="to_unit")(inputs)
    stages = list(enumerate(widths))
    if correlation:
        single = keras.Input((input_size, input_size, 1), name="patch")
        f = single
        for i, width in stages[:siamese_stages]:
            f = _stage(f, width, f"siamese{i}")
        f = keras.layers.UnitNormalization(axis=-1, name="unit_features")(f)
        encoder = keras.Model(single, f, name="siamese_encoder")
        fixed = encoder(TakeChannel(0, name="fixed")(x))
        moving = encoder(TakeChannel(1, name="moving")(x))
        if correlation > 0:
            x = Correlation(correlation, name="correlation")(fixed, moving)
        else:
            x = GlobalCorrelation(name="correlation")(fixed, moving)
            flow = keras.layers.Flatten(name="flow")(SoftArgmaxFlow(name="matches")(x))
        stages = stages[siamese_stages:]
    for i, width in stages:
        x = _stage(x, width, f"conv{i}")
    features = keras.layers.Flatten(name="flatten")(x)
    if correlation < 0:  # the heads see the matches' displacements beside the conv features
        features = keras.layers.Concatenate(name="features")([features, flow])
    heads = {
        "translation": _head(features, "translation", [0.0, 0.0], head_width, dropout),
        "scale": _head(features, "scale", [1.0, 1.0], head_width, dropout),
        "rotation": _head(features, "rotation", [0.0, 0.0], head_width, dropout),
    }
    matrix = AffineFromHeads(name="matrix")(heads["translation"], heads["scale"], heads["rotation"])
    return keras.Model(inputs, {**heads, "matrix": matrix}, name="fundusreg")


def load_network(path):
    """Load a ``.keras`` model in safe mode (no pickled code); a clear error if it is not one."""
    import zipfile
    from pathlib import Path

    if not str(path).endswith(".keras"):
        raise InputError(path, "not a .keras model file")
    if not Path(path).is_file():
        raise InputError(path, "model file not found")
    if not zipfile.is_zipfile(path):  # e.g. an HDF5 or pickle file renamed, or a truncated one
        raise InputError(path, "not a Keras model archive (.keras files are zip archives)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types for a bad archive
        raise InputError(path, f"cannot load the model ({type(e).__name__})") from None


def keras_matrix_function(model):
    """The model's ``matrix`` output as Keras' own ``tf.function`` of a float32 (B, S, S, 2)
    tensor: what LiteRT is converted from, and what ``python Network.py`` times it against."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    spec = tf.TensorSpec((None, size, size, 2), tf.float32)
    return tf.function(lambda x: model(x, training=False)["matrix"], input_signature=[spec])


@functools.cache
def matrix_function(model):
    """The model's ``matrix`` output as a function of a float32 (B, S, S, 2) array, returning a
    (B, 2, 3) array, run by LiteRT (TensorFlow Lite's CPU runtime, XNNPACK kernels): what
    registration calls. For one input on 2 cores it takes 0.6-0.9 ms where Keras' own
    ``tf.function`` takes 4-5 ms, XLA-compiled or not: at this size the cost of a TensorFlow call
    is most of it. The same matrices within 2e-6. Converted once per model (about 2 s), shared by
    all its callers (one thread at a time: an interpreter is not shared between threads safely);
    one interpreter per batch size, made when first asked for (5 ms). Its threads: TensorFlow's
    intra-op setting where one is set (Testing.py's THREADS), else all; 1 thread instead of 2
    made no difference to registration here (a median 1-2 ms either way on the dev sets, the
    same matrices).
    The converter turns UnitNormalization into LiteRT's L2 normalisation, which lacks Keras'
    epsilon: a feature cell that is zero in every channel (an untrained network on a blank input)
    gives NaN there, where Keras gives a number; such inputs are run by Keras instead."""
    import tensorflow as tf

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # no LiteRT wheel (Intel Macs): TensorFlow's own (deprecated) copy
        Interpreter = tf.lite.Interpreter

    function = keras_matrix_function(model)
    holder = tf.Module()  # tracks the weights, for the converter to take them in as constants
    holder.weights = [v.value for v in model.variables]
    flat = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], holder
    ).convert()
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    interpreters = {}

    def matrix(x):
        if len(x) not in interpreters:
            with quiet_native_log():  # LiteRT's INFO line on its CPU delegate
                interpreter = Interpreter(model_content=flat, num_threads=threads)
                index = interpreter.get_input_details()[0]["index"]
                interpreter.resize_tensor_input(index, x.shape)
                interpreter.allocate_tensors()
            interpreters[len(x)] = interpreter, index, interpreter.get_output_details()[0]["index"]
        interpreter, index, output = interpreters[len(x)]
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        matrices = interpreter.get_tensor(output)  # a copy
        lost = ~np.isfinite(matrices).all(axis=(1, 2))
        if lost.any():  # see the docstring: Keras' own arithmetic for these inputs
            matrices[lost] = model(x[lost], training=False)["matrix"].numpy()
        return matrices

    return matrix


# ----------------------------------------------------------------------------------------------


def main(args):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(args.THREADS)
    model = build_network(
        args.INPUT_SIZE,
        args.WIDTHS,
        args.HEAD_WIDTH,
        args.DROPOUT,
        args.CORRELATION_RADIUS,
        args.SIAMESE_STAGES,
    )
    print(f"parameters: {model.count_params():,}")
    runtimes = {
        "Keras (tf.function)": keras_matrix_function(model),
        "LiteRT (registration)": matrix_function(model),
    }
    x = (
        np.random.default_rng(0)
        .uniform(0, 255, (8, args.INPUT_SIZE, args.INPUT_SIZE, 2))
        .astype(np.float32)
    )
    for name, predict in runtimes.items():
        for batch in (1, 8):
            predict(x[:batch])
            start = time.perf_counter()
            calls = max(1, args.TIME_PATCHES // batch)
            for _ in range(calls):
                predict(x[:batch])
            per_patch = (time.perf_counter() - start) / (calls * batch)
            print(
                f"CPU time per patch, {name}, batch {batch}, {args.THREADS} threads: "
                f"{per_patch * 1000:.2f} ms"
            )


if __name__ == "__main__":
    exit_on_input_error(lambda: main(cli(globals(), __doc__)))
