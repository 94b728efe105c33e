"""The keras backbone style against TensorFlow itself (issue 11, item 3).

tf.keras builds the Caffe-style ResNet (keras.applications.ResNet50) and a seed-style
three-branch model (built below as the seed's ``init_model`` does: stem and stages as nested
sub-models, two conv5 copies, stripe 3x3 conv + ReLU, GAP, clip, BN neck eps 2e-5, bias-free
dense) with seeded random weights and random BN statistics; Keras saves them to .h5; alr-fast
loads the files with h5py and must give the same outputs on the same uint8 images, through its
own preprocessing, to 1e-4 relative in float32. The seed's released files were written by TF 2.2,
so the three-branch file is also rewritten in that spelling (suffixed names, ``:0``, byte
attributes, split name lists) with adaptive-L2 thetas, which must land on the right tensors.

Skipped without TensorFlow or h5py. Input 64x32 and one model build per file keep it to a few
seconds after TensorFlow's import.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (loads triton, which segfaults when it loads after TensorFlow)
from keras_files import read_layout, read_model_config, tf22_spelling, write_layout

from alr_fast.config import Config
from alr_fast.keras_weights import load_keras_training_model
from alr_fast.model import ReidNet
from alr_fast.pipelines.augment import KERAS_STYLE, normalize

tf = pytest.importorskip("tensorflow", reason="the tf.keras comparison needs tensorflow (pip install tensorflow-cpu)")
pytest.importorskip("h5py", reason="the Keras loaders need h5py")

# Keras' own variables trip numpy 2's __array__ copy deprecation when Keras saves them
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
keras = tf.keras
layers = keras.layers
H, W, CLASSES = 64, 32, 7
RTOL = 1e-4  # float32, relative to the largest magnitude of the compared tensor


def _randomize(model, rng: np.random.Generator, final_gamma: float = 1.0) -> None:
    """Seeded random biases, BN affine and moving statistics (kernels keep Keras' seeded init)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomize(layer, rng, final_gamma)
            continue
        values = []
        for w in layer.weights:
            kind, shape = w.name.split(":")[0].split("/")[-1], tuple(w.shape)
            if kind == "bias":
                values.append(rng.normal(0, 0.05, shape))
            elif kind == "gamma":
                g = rng.uniform(0.5, 1.5, shape)
                values.append(g * (final_gamma if layer.name.endswith("_3_bn") else 1.0))
            elif kind in ("beta", "moving_mean"):
                values.append(rng.normal(0, 0.1, shape))
            elif kind == "moving_variance":
                values.append(rng.uniform(0.5, 2.0, shape))
            else:
                values.append(w.numpy())
        if values:
            layer.set_weights([np.asarray(v, dtype=np.float32) for v in values])


def _block(x, filters, stride=1, conv_shortcut=True, name=""):
    """keras.applications.resnet's v1 block (the seed's resnet_common.block1), layer names included."""
    bn = dict(axis=3, epsilon=1.001e-5)
    if conv_shortcut:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=name + "_0_conv")(x)
        shortcut = layers.BatchNormalization(**bn, name=name + "_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=name + "_1_conv")(x)
    x = layers.BatchNormalization(**bn, name=name + "_1_bn")(x)
    x = layers.Activation("relu", name=name + "_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", name=name + "_2_conv")(x)
    x = layers.BatchNormalization(**bn, name=name + "_2_bn")(x)
    x = layers.Activation("relu", name=name + "_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=name + "_3_conv")(x)
    x = layers.BatchNormalization(**bn, name=name + "_3_bn")(x)
    x = layers.Add(name=name + "_add")([shortcut, x])
    return layers.Activation("relu", name=name + "_out")(x)


def _stage(shape, filters, blocks, stride, stage, model_name):
    inp = keras.Input(shape)
    x = _block(inp, filters, stride=stride, name=f"conv{stage}_block1")
    for i in range(2, blocks + 1):
        x = _block(x, filters, conv_shortcut=False, name=f"conv{stage}_block{i}")
    return keras.Model(inp, x, name=model_name)


def build_seed_model(region_num: int = 2, classes: int = CLASSES):
    """The seed's three-branch ResNet-50 (docs/METHOD.md §2) -> (training model, probe with logits + features)."""
    inp = keras.Input((H, W, 3))
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inp)
    x = layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    stem = keras.Model(inp, x, name="model")
    pieces = [stem]
    shape = stem.output.shape[1:]
    for k, (filters, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2))):
        pieces.append(_stage(shape, filters, blocks, stride, k + 2, f"model_{k + 1}"))
        shape = pieces[-1].output.shape[1:]
    # two conv5 copies with the same layer names, last stride 1; the global one is built first
    conv5_global = _stage(shape, 512, 3, 1, 5, "model_4")
    conv5_regional = _stage(shape, 512, 3, 1, 5, "model_5")

    image = keras.Input((H, W, 3))
    x4 = image
    for piece in pieces:
        x4 = piece(x4)
    probs, feats, logits = [], [], []

    def objective(t):
        f = layers.ReLU(max_value=1.0)(layers.GlobalAveragePooling2D()(t))  # clip to [0, 1] of a post-ReLU mean
        z = layers.BatchNormalization(epsilon=2e-5)(f)
        y = layers.Dense(classes, use_bias=False, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.05))(z)
        probs.append(layers.Activation("softmax")(y))
        feats.append(f)
        logits.append(y)

    objective(conv5_global(x4))
    r = conv5_regional(x4)
    height = r.shape[1]
    size = height // region_num
    for i in range(region_num):
        start, stop = i * size, height if i == region_num - 1 else (i + 1) * size
        s = layers.Cropping2D(((start, height - stop), (0, 0)))(r)
        s = layers.Conv2D(r.shape[-1] // region_num, 3, padding="same")(s)
        objective(layers.Activation("relu")(s))
    training = keras.Model(image, probs + feats)
    probe = keras.Model(image, logits + feats)
    return training, probe


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, H, W), dtype=np.uint8)


def _keras_input(images: np.ndarray) -> np.ndarray:
    """The seed's preprocessing in Keras: NHWC RGB float32 -> preprocess_input(mode='caffe')."""
    return np.ascontiguousarray(keras.applications.resnet.preprocess_input(images.transpose(0, 2, 3, 1).astype(np.float32)))


def _close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32))
    scale = float(expected.abs().max())
    assert scale > 0, what
    err = float((actual.detach().float() - expected).abs().max()) / scale
    assert err <= RTOL, f"{what}: max |alr-fast - tf.keras| = {err:.2e} of max |tf.keras| (allowed {RTOL})"


def _keras_cfg(path) -> Config:
    c = Config()
    return dataclasses.replace(
        c,
        data=dataclasses.replace(c.data, height=H, width=W),
        model=dataclasses.replace(c.model, backbone_style="keras", backbone="resnet50", pretrained=str(path)),
    )


def test_preprocessing_is_keras_caffe_mode():
    images = _images(3, seed=1)
    ours = normalize(torch.from_numpy(images), style=KERAS_STYLE)
    theirs = torch.from_numpy(_keras_input(images)).permute(0, 3, 1, 2)
    assert torch.equal(ours, theirs)  # the same float32 ops: swap, subtract


@pytest.fixture(scope="module")
def notop_file(tmp_path_factory):
    """keras.applications.ResNet50 (no top) with random weights, saved as the notop files are."""
    keras.utils.set_random_seed(11)
    net = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(H, W, 3))
    _randomize(net, np.random.default_rng(11), final_gamma=0.3)
    folder = tmp_path_factory.mktemp("keras_notop")
    net.save(folder / "full.h5")
    path = folder / "resnet50_notop.h5"
    # the released notop files are weights only (save_weights): the same groups, at the root
    write_layout(path, read_layout(folder / "full.h5"), full_model=False)
    images = _images(4, seed=2)
    return path, images, net.predict(_keras_input(images), verbose=0)


def test_backbone_matches_keras_applications_resnet50(notop_file):
    path, images, expected = notop_file
    m = ReidNet(CLASSES, backbone="resnet50", pretrained=str(path), last_stride=2, backbone_style="keras").eval()
    assert m.keras_load_info.kind == "notop" and m.keras_load_info.tensors == 378  # (53 convs x 2 + 53 BNs x 4) + the second conv5 copy (10 x 2 + 10 x 4)
    x = normalize(torch.from_numpy(images), style=KERAS_STYLE)
    with torch.no_grad():
        x3 = m.layer3(m.layer2(m.layer1(m.stem(x))))
        for conv5 in (m.layer4, m.layer4_regional):  # a notop file initialises both copies
            _close(conv5(x3).permute(0, 2, 3, 1), expected, "conv5 map")


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """A seed-style training_model.h5 as Keras writes it, the TF 2.2 spelling of it with thetas,
    and tf.keras' logits and features on a batch of images (plus its flipped copy)."""
    keras.utils.set_random_seed(5)
    training, probe = build_seed_model()
    _randomize(training, np.random.default_rng(5), final_gamma=0.3)
    folder = tmp_path_factory.mktemp("keras_seed")
    training.save(folder / "training_model.h5")
    layout = read_layout(folder / "training_model.h5")
    rng = np.random.default_rng(6)
    thetas = {}
    for group, weights in layout:
        for name, _ in weights:
            layer, kind = name.split(":")[0].rsplit("/", 1)
            if kind in ("kernel", "bias", "gamma", "beta"):
                thetas[(group, layer, kind)] = float(np.float32(rng.uniform(-3, 1)))  # stored as float32
    tf22 = folder / "training_model_tf22.h5"
    write_layout(tf22, tf22_spelling(layout, thetas), full_model=True, as_bytes=True, split_over=40,
                 model_config=read_model_config(folder / "training_model.h5"))
    images = _images(4, seed=3)
    out = probe.predict(_keras_input(images), verbose=0)
    flipped = probe.predict(_keras_input(images[..., ::-1].copy()), verbose=0)
    weights = {(g, n.split(":")[0].rsplit("/", 1)[0], n.split(":")[0].rsplit("/", 1)[1]): v for g, ws in layout for n, v in ws}
    return {"keras": folder / "training_model.h5", "tf22": tf22}, images, out, flipped, thetas, weights


def _fingerprint(values: np.ndarray) -> tuple:
    """Invariant under the HWIO -> OIHW transpose: size, sum, sum of squares."""
    v = np.asarray(values, dtype=np.float64)
    return v.size, round(float(v.sum()), 5), round(float((v * v).sum()), 5)


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["keras", "tf22"])
def test_three_branch_model_matches_tf_keras(seed_files, spelling):
    files, images, out, flipped, thetas, weights = seed_files
    task, info = load_keras_training_model(files[spelling], _keras_cfg(files[spelling]))
    model = task.model.eval()
    assert info.kind == "training_model" and info.num_classes == CLASSES and info.classifiers_loaded
    assert len(task.regularizer) == 265
    x = normalize(torch.from_numpy(images), style=KERAS_STYLE)
    with torch.no_grad():
        feats, logits = model(x)
    for i in range(3):
        _close(logits[i], out[i], f"logits of branch {i}")
        _close(feats[i], out[3 + i], f"features of branch {i}")
    inside = np.mean([((f > 0.01) & (f < 0.99)).float().mean().item() for f in feats])
    assert inside > 0.3, f"only {inside:.0%} of the features lie inside the clip range: the test would be weak"
    expected = (np.concatenate(out[3:], axis=1) + np.concatenate(flipped[3:], axis=1)) / 2
    _close(model.embed(x, flip=True), expected, "flip-averaged inference feature")

    loaded = dict(zip(task.regularizer.names(), (float(t.detach()) for t in task.regularizer.thetas)))
    if spelling == "keras":
        assert not info.thetas and set(loaded.values()) == {0.0}  # no thetas in a file without them
        return
    assert len(info.thetas) == 265
    # every alr-fast tensor carries the theta that the file gave the Keras weight with its values
    by_values = {_fingerprint(weights[key]): theta for key, theta in thetas.items()}
    params = dict(model.named_parameters())
    for name, theta in loaded.items():
        assert theta == by_values[_fingerprint(params[name].detach().numpy())], name


@pytest.mark.slow
def test_fine_tune_from_a_training_model_with_other_classes(seed_files):
    files, images, out, *_ = seed_files
    from alr_fast.task import build_task

    task = build_task(_keras_cfg(files["tf22"]), num_classes=CLASSES + 3)
    info = task.model.keras_load_info
    assert not info.classifiers_loaded and "classifiers" in info.notes[0]
    assert len(info.thetas) == 265 - 3  # the classifiers' thetas stay with their fresh kernels
    with torch.no_grad():
        feats, logits = task.model.eval()(normalize(torch.from_numpy(images), style=KERAS_STYLE))
    _close(feats[0], out[3], "features after a fine-tuning load")
    assert logits[0].shape == (4, CLASSES + 3)
