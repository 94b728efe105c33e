"""The keras input style through every loader, the seed's augmentation gate, and the keras model's
shape facts (no TensorFlow needed; tests/test_keras_tf.py compares against TensorFlow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from loader_helpers import jpeg_bytes, run_epochs, write_files

from alr_fast.config import Config, ConfigError, load_config
from alr_fast.data import train_augmentation
from alr_fast.model import ReidNet
from alr_fast.pipelines import DecodedCacheTrainLoader, IdentitySampler, TorchEvalLoader, TorchTrainLoader, load_jpeg_store
from alr_fast.pipelines.augment import (
    ERASE_FILL,
    KERAS_STYLE,
    AugmentParams,
    TORCHVISION_STYLE,
    InputStyle,
    augment_batch,
    decode_resize,
    input_style_for,
    normalize,
)
from alr_fast.regularizer import regularized_tensors

H, W, P, K, STEPS, SEED = 32, 16, 3, 2, 3, 4


def test_keras_style_is_bgr_minus_the_means_in_pixels():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (2, 3, 5, 4), dtype=np.uint8))
    out = normalize(img, style=KERAS_STYLE)
    mean = torch.tensor([103.939, 116.779, 123.68], dtype=torch.float32).view(1, 3, 1, 1)
    assert torch.equal(out, img.flip(1).float() - mean)  # float32 subtraction, no scaling
    # the erase fill, RGB (125, 122, 113) in uint8, lands at BGR (9.061, 5.221, 1.32)
    fill = torch.tensor(ERASE_FILL, dtype=torch.uint8).view(1, 3, 1, 1)
    assert normalize(fill, style=KERAS_STYLE).flatten().tolist() == pytest.approx([9.061, 5.221, 1.32], abs=1e-4)
    # zero padding stays 0 in pixel space: -mean after the preprocessing
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), style=KERAS_STYLE).flatten()
    assert zero.tolist() == pytest.approx([-103.939, -116.779, -123.68])
    cl = img.contiguous(memory_format=torch.channels_last)
    got = normalize(cl, *KERAS_STYLE.device_tensors("cpu"), torch.bfloat16, style=KERAS_STYLE)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.bfloat16
    assert torch.equal(got, out.to(torch.bfloat16))
    assert KERAS_STYLE.pixel_std == (1.0, 1.0, 1.0) and TORCHVISION_STYLE.pixel_mean[0] == 255.0 * 0.485
    assert input_style_for("keras") is KERAS_STYLE and input_style_for("torchvision") is TORCHVISION_STYLE
    with pytest.raises(ValueError, match="unknown backbone style 'caffe'"):
        input_style_for("caffe")
    with pytest.raises(ValueError, match=r"channels must be"):
        InputStyle("odd", (1, 0, 2), 1.0, (0, 0, 0), (1, 1, 1))


def test_augmentation_false_also_turns_erasing_off():
    d = Config().data
    assert train_augmentation(d) == dict(pad=10, flip_p=0.5, erase_p=0.5)
    off = d.__class__(augmentation=False, random_erasing=True)
    assert train_augmentation(off) == dict(pad=0, flip_p=0.0, erase_p=0.0)  # the seed: no augmentor at all
    assert train_augmentation(d.__class__(random_erasing=False)) == dict(pad=10, flip_p=0.5, erase_p=0.0)


@pytest.mark.parametrize("backbone,count", [("resnet50", 265), ("resnet101", 469), ("resnet152", 673)])
def test_keras_model_regularizes_as_many_tensors_as_the_seed(backbone, count):
    m = ReidNet(5, backbone=backbone, pretrained="none", backbone_style="keras")
    assert len(regularized_tensors(m)) == count
    block = m.layer4[0]
    assert block.conv1.stride == (1, 1) and block.downsample[0].stride == (1, 1)  # last stride 1
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer2[0].conv2.stride == (1, 1)  # stride on the 1x1
    assert all(mod.bias is not None for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    assert m.stem[1].eps == 1.001e-5 and m.necks[0].eps == 2e-5 and m.stem[1].momentum == 0.01


def test_keras_style_needs_a_keras_backbone():
    with pytest.raises(ConfigError, match="model.backbone.*backbone_style=keras"):
        load_config(None, ["model.backbone_style=keras", "model.backbone=resnet18"])
    with pytest.raises(ConfigError, match="model.backbone_style"):
        load_config(None, ["model.backbone_style=caffe"])


# ----------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 3)
    folder = tmp_path_factory.mktemp("keras_style")
    blobs = [jpeg_bytes(rng, int(rng.integers(24, 50)), int(rng.integers(12, 30))) for _ in labels]
    store, _ = load_jpeg_store(write_files(folder, blobs))
    return store, labels, rng.integers(1, 5, size=len(labels))


def _train(cls, dataset, **kw):
    store, labels, camids = dataset
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    return cls(store, labels, camids, sampler, height=H, width=W, seed=SEED, input_style=KERAS_STYLE, **kw)


def test_torch_and_cache_loaders_apply_the_keras_style(dataset):
    store = dataset[0]
    torch_epochs = run_epochs(_train(TorchTrainLoader, dataset), 2)
    loader = _train(TorchTrainLoader, dataset)
    indices, params = loader.stream.next_epoch()  # the same streams, drawn again
    decoded = torch.stack([decode_resize(d, H, W) for d in store.data])
    for step, (images, _, _) in enumerate(torch_epochs[0]):
        rows = slice(step * P * K, (step + 1) * P * K)
        expected = normalize(augment_batch(decoded[indices[rows]], AugmentParams.from_array(params[rows])), style=KERAS_STYLE)
        assert torch.equal(images, expected)
    cached = run_epochs(_train(DecodedCacheTrainLoader, dataset, decoder="torch"), 2)
    for a, b in zip(cached, torch_epochs):
        for (x, p, c), (y, q, d) in zip(a, b):
            assert torch.equal(x, y) and torch.equal(p, q)
    evaluated = next(iter(TorchEvalLoader(store, dataset[1], dataset[2], height=H, width=W, batch_size=5,
                                          input_style=KERAS_STYLE)))[0]
    assert torch.equal(evaluated, normalize(decoded[:5], style=KERAS_STYLE))


@pytest.mark.dali
def test_dali_loaders_apply_the_keras_style(dataset):
    pytest.importorskip("nvidia.dali")
    from alr_fast.pipelines.dali import DaliEvalLoader, DaliTrainLoader

    store = dataset[0]
    got = run_epochs(_train(DaliTrainLoader, dataset, num_threads=1), 1)[0]
    expected = run_epochs(_train(TorchTrainLoader, dataset), 1)[0]
    for (x, p, _), (y, q, _) in zip(got, expected):
        assert torch.equal(p, q)
        diff = (x - y).abs()
        # one grey level of the resize is 1.0 here (no scaling); BGR order and means as the reference
        assert diff.max().item() <= 1.0 + 1e-4 and (diff > 1e-4).float().mean().item() < 0.1
    dali_eval = next(iter(DaliEvalLoader(store, dataset[1], dataset[2], height=H, width=W, batch_size=5,
                                         num_threads=1, input_style=KERAS_STYLE)))[0]
    reference = normalize(torch.stack([decode_resize(d, H, W) for d in store.data[:5]]), style=KERAS_STYLE)
    assert (dali_eval - reference).abs().max().item() <= 1.0 + 1e-4
    assert (dali_eval - reference).abs().mean().item() < 0.1  # not a channel swap away (that is ~10+)
