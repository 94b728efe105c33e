"""The Keras .h5 loaders without TensorFlow: files written with h5py in the seed's layout from a
random keras-style model (round trip, the TF 2.2 spelling, errors) and ``alr-fast evaluate`` of
a training_model.h5. tests/test_keras_tf.py checks the same loaders against TensorFlow."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py", reason="the Keras loaders need h5py")

from keras_files import layout_from_model, tf22_spelling, write_layout  # noqa: E402

from alr_fast.keras_weights import read_keras_h5  # noqa: E402
from alr_fast.model import PretrainedWeightsError, ReidNet  # noqa: E402
from alr_fast.task import build_task  # noqa: E402
from alr_fast.config import load_config  # noqa: E402

CLASSES = 6
HEADS = {"conv2d": "stripe_convs", "batch_normalization": "necks", "dense": "classifiers"}


def _random_model(seed: int) -> ReidNet:
    torch.manual_seed(seed)
    m = ReidNet(CLASSES, backbone="resnet50", pretrained="none", backbone_style="keras")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = _random_model(1)
    layout = layout_from_model(model)
    rng = np.random.default_rng(2)
    thetas = {(g, n.rsplit("/", 1)[0], n.rsplit("/", 1)[1]): float(np.float32(rng.uniform(-3, 1)))
              for g, ws in layout for n, _ in ws if n.rsplit("/", 1)[1] in ("kernel", "bias", "gamma", "beta")}
    folder = tmp_path_factory.mktemp("keras_weights")
    path = folder / "training_model.h5"
    write_layout(path, tf22_spelling(layout, thetas), full_model=True, as_bytes=True, split_over=64)
    return model, layout, thetas, path, folder


def _cfg(path, **model):
    return load_config("market1501_resnet50_keras", [f"model.pretrained={path}", "data.height=64", "data.width=32",
                                                     *[f"model.{k}={v}" for k, v in model.items()]])


@pytest.mark.slow
def test_training_model_round_trip_in_tf22_spelling(source):
    model, layout, thetas, path, _ = source
    with h5py.File(path) as f:  # the spelling under test really is there
        g = f["model_weights/model_4"]
        assert "weight_names" not in g.attrs and "weight_names0" in g.attrs and g.attrs["weight_names0"].dtype.kind == "S"
        assert any(n.endswith(b"l2_regularization_factor:0") for n in g.attrs["weight_names0"])
    task = build_task(_cfg(path), CLASSES)
    info = task.model.keras_load_info
    assert info.kind == "training_model" and info.classifiers_loaded and len(info.thetas) == 265
    got, want = task.model.state_dict(), model.state_dict()
    for key, value in want.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), key
    names = task.regularizer.names()
    entries = model.keras_layers()
    expected = {}
    for (group, layer, kind), theta in thetas.items():
        if layer in entries:
            path_ = entries[layer][1 if group == "model_5" else 0][0]
        else:  # heads: Keras' default names, numbered in branch order
            head = re.match(r"^(conv2d|batch_normalization|dense)(?:_(\d+))?$", layer)
            path_ = f"{HEADS[head.group(1)]}.{int(head.group(2) or 0)}"
        expected[f"{path_}.{'weight' if kind in ('kernel', 'gamma') else 'bias'}"] = theta
    assert {n: float(t.detach()) for n, t in zip(names, task.regularizer.thetas)} == expected


@pytest.mark.slow
def test_notop_file_fills_both_conv5_copies_and_mismatches_are_named(source, tmp_path):
    model, layout, _, _, _ = source
    backbone = [(g, w) for g, w in layout if g in ("model", "model_4")]  # one conv5, no heads
    notop = tmp_path / "notop.h5"
    write_layout(notop, backbone, full_model=False)
    m = ReidNet(CLASSES, backbone="resnet50", pretrained=str(notop), backbone_style="keras")
    assert m.keras_load_info.kind == "notop"
    for a, b in zip(m.layer4_regional.state_dict().values(), model.layer4.state_dict().values()):
        assert torch.equal(a, b)

    def broken(change):
        bad = tmp_path / "bad.h5"
        lay = [(g, [(n, v.copy()) for n, v in w]) for g, w in backbone]
        change(lay)
        write_layout(bad, lay, full_model=False)
        return ReidNet(CLASSES, backbone="resnet50", pretrained=str(bad), backbone_style="keras")

    with pytest.raises(PretrainedWeightsError, match=r"'model/conv3_block2_2_conv/kernel' has shape \(3, 3, 128, 127\)"):
        broken(lambda lay: lay[0][1].__setitem__(
            next(i for i, (n, _) in enumerate(lay[0][1]) if n == "conv3_block2_2_conv/kernel"),
            ("conv3_block2_2_conv/kernel", np.zeros((3, 3, 128, 127), np.float32))))
    with pytest.raises(PretrainedWeightsError, match=r"no weight 'conv4_block6_3_bn/gamma'"):
        broken(lambda lay: lay[0][1].__delitem__(
            next(i for i, (n, _) in enumerate(lay[0][1]) if n == "conv4_block6_3_bn/gamma")))
    with pytest.raises(PretrainedWeightsError, match=r"layer 'conv4_block7_1_conv', which this backbone lacks"):
        broken(lambda lay: lay[0][1].append(("conv4_block7_1_conv/kernel", np.zeros((1, 1, 1024, 256), np.float32))))
    with pytest.raises(PretrainedWeightsError, match="no such Keras .h5 file"):
        ReidNet(CLASSES, pretrained=str(tmp_path / "missing.h5"), backbone_style="keras")


def test_h5py_missing_says_what_to_install(monkeypatch, source):
    import builtins

    real = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match=r"pip install h5py .*alr-fast\[keras\]"):
        read_keras_h5(source[3])


@pytest.mark.slow
def test_evaluate_a_training_model_h5_from_the_cli(source, tmp_path, capsys):
    from alr_fast.cli import main
    from alr_fast.synthetic import make_synthetic

    _, _, _, path, _ = source
    make_synthetic(tmp_path / "data", "market1501", num_train_ids=4, num_test_ids=4, num_cameras=2,
                   images_per_camera=2, num_distractors=2, image_size=(64, 32), seed=0)
    rc = main(["evaluate", str(path), "--config", "market1501_resnet50_keras", f"data.root={tmp_path / 'data'}",
               "data.height=64", "data.width=32", "run.device=cpu", "run.progress=false", "data.num_workers=0",
               "--out", str(tmp_path / "report")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(next((tmp_path / "report").glob("evaluation-*.json")).read_text())
    assert report["keras"]["classes"] == CLASSES and report["keras"]["dataset_classes"] == 4
    assert report["keras"]["thetas"] == report["keras"]["regularized"] == 265
    assert 0.0 < report["metrics"]["mAP"] <= 1.0 and report["config"]["model"]["backbone_style"] == "keras"
    rc = main(["evaluate", str(path), f"data.root={tmp_path / 'data'}", "run.device=cpu"])
    assert rc == 2 and "model.backbone_style=keras" in capsys.readouterr().err


def test_keras_imagenet_file_is_taken_from_the_hub_folder_or_named_when_missing(tmp_path, monkeypatch):
    from alr_fast.keras_weights import KERAS_RESNET_URL, KerasWeightsError, keras_imagenet_file

    def offline(url, dst, progress=True):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(KerasWeightsError) as err:
        keras_imagenet_file("resnet101", tmp_path)
    message = str(err.value)
    assert KERAS_RESNET_URL.format(name="resnet101") in message
    assert str(tmp_path / "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5") in message
    placed = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    placed.write_bytes(b"")  # present: used as it is, nothing fetched
    assert keras_imagenet_file("resnet50", tmp_path) == placed
