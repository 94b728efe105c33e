"""Keras .h5 weights for the keras backbone style, read with h5py (no TensorFlow needed).

Two kinds of file:

* the Keras ImageNet *notop* files (``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``,
  101/152 likewise; written by ``save_weights``): one group per layer at the root. They
  initialise the backbone, both conv5 copies alike (``model.pretrained=PATH.h5`` or ``imagenet``);
* the seed's ``training_model.h5`` (``training_model.save(path)``: the whole three-branch model,
  training config and optimizer state): one group per top-level layer under ``model_weights``;
  each nested sub-model (stem, stages, the two conv5 copies) is one group holding all its layers'
  weights, the heads are one group per layer, and each adaptive-L2 theta is a scalar
  ``.../<layer>/<kernel|bias|gamma|beta>/Regularizer.../l2_regularization_factor:0`` in its
  layer's group. ``optimizer_weights`` is ignored.

Spellings handled (TF 2.2 wrote the released files, newer Keras writes differently): weight
names with or without ``:0``; TF's numeric suffixes on layer names (``conv1_conv_1``,
``dense_3``), stripped to find the Keras layer; attribute strings as bytes or str; long name
lists split into ``weight_names0``, ``weight_names1``, ... by Keras' HDF5 header limit.

Layer matching. Backbone layers are found by their Keras names (``conv4_block6_2_conv``). The two
conv5 copies have the same layer names and differ only by their group (and suffix). The global
copy is the one whose output feeds a GlobalAveragePooling2D in the file's ``model_config`` graph
(the regional copy feeds the stripe slices); without a usable graph, the group whose name says
``global``, else the group created first (natural order of the names, ``model_4`` before
``model_5``: the seed replicates the global copy first). Not the layer order: Keras sorts layers
by depth, which puts the regional copy, on the longer path, first. A notop file has one conv5,
loaded into both. Heads are recognised by their weights and ordered by creation (natural order of
their group names, ``dense_3`` < ``dense_4``; the seed builds the global branch, then stripe 1,
2, ...): 4-D kernels are the stripe convs, layers with moving statistics the BN necks (the
global branch's, which is wider, first), 2-D kernels the classifiers (likewise).
Conversions: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in), BN gamma / beta /
moving mean / moving variance -> weight / bias / running_mean / running_var.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

H5_SUFFIXES = (".h5", ".hdf5")
KERAS_RESNET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
_SUFFIX = re.compile(r"(_\d+)+$")
_BACKBONE_LAYER = re.compile(r"^conv1_(conv|bn)$|^conv[2-5]_block\d+_[0-3]_(conv|bn)$")
# Keras weight kind -> (torch attribute, how the array is laid out for torch)
_CONV = {"kernel": "weight", "bias": "bias"}
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_THETA_KIND = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


class KerasWeightsError(RuntimeError):
    """A Keras .h5 file that cannot be read or does not fit the model; the message names the weight."""


def is_keras_file(path: str) -> bool:
    """A path that names a Keras HDF5 file (by its suffix)."""
    return str(path).lower().endswith(H5_SUFFIXES)


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ImportError(
            "reading Keras .h5 weights needs h5py, which is not installed: pip install h5py "
            "(or pip install 'alr-fast[keras]')"
        ) from exc
    return h5py


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _name_list(attrs, key: str) -> list[str]:
    """An attribute list that Keras may have split into ``key0``, ``key1``, ... (HDF5 header limit)."""
    if key in attrs:
        values = list(np.atleast_1d(attrs[key]))
    else:
        values, i = [], 0
        while f"{key}{i}" in attrs:
            values += list(np.atleast_1d(attrs[f"{key}{i}"]))
            i += 1
    return [_text(v) for v in values if _text(v)]


@dataclass(frozen=True)
class KerasWeight:
    """One weight of a Keras file, in file order."""

    group: str  # top-level layer group ("model_4", "dense_3", "conv1_conv")
    layer: str  # Keras layer name without TF's numeric suffix ("conv1_conv")
    kind: str  # kernel | bias | gamma | beta | moving_mean | moving_variance
    theta: bool  # the adaptive regularizer's l2_regularization_factor of (layer, kind)
    name: str  # the full weight name as written, for messages
    value: np.ndarray


def _parse_weight_name(group: str, name: str) -> tuple[str, str, bool] | None:
    """(layer, kind, is_theta) of a weight name; None for weights the models do not use."""
    parts = [re.sub(r":\d+$", "", p) for p in name.split("/")]
    if parts[-1].startswith("l2_regularization_factor"):
        reg = next((i for i, p in enumerate(parts) if p.startswith("Regularizer")), None)
        if reg is None or reg < 2:
            raise KerasWeightsError(f"theta '{name}' in group '{group}' is not under <layer>/<kind>/Regularizer")
        return _SUFFIX.sub("", parts[reg - 2]), parts[reg - 1], True
    if parts[-1].startswith("l1_regularization_factor"):
        return None  # the seed's unused L1 branch
    layer = parts[-2] if len(parts) >= 2 else group
    return _SUFFIX.sub("", layer), parts[-1], False


def read_keras_h5(path: str | Path, values: bool = True) -> list[KerasWeight]:
    """Every weight of a Keras HDF5 file (weights-only or a whole saved model), in layer order.

    values=False reads only the shapes (each value is a zero-stride array of that shape)."""
    h5py = _h5py()
    path = Path(path).expanduser()
    if not path.is_file():
        raise KerasWeightsError(f"{path}: no such Keras .h5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise KerasWeightsError(f"{path}: cannot be read as an HDF5 file ({exc})") from exc
    out: list[KerasWeight] = []
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        groups = _name_list(root.attrs, "layer_names")
        if not groups:
            raise KerasWeightsError(f"{path}: no 'layer_names' attribute: not a Keras weights file")
        for group in groups:
            if group not in root:
                raise KerasWeightsError(f"{path}: layer group '{group}' is listed but missing")
            g = root[group]
            for name in _name_list(g.attrs, "weight_names"):
                parsed = _parse_weight_name(group, name)
                if parsed is None:
                    continue
                if name not in g:
                    raise KerasWeightsError(f"{path}: weight '{group}/{name}' is listed but missing")
                layer, kind, theta = parsed
                data = g[name]
                value = np.asarray(data[()]) if values else np.broadcast_to(np.float32(0), data.shape)
                out.append(KerasWeight(group, layer, kind, theta, f"{group}/{name}", value))
    return out


def _inbound_names(nodes):
    """Layer names a layer's ``inbound_nodes`` refer to, in the Keras 2 (``[[name, i, j, {}]]``)
    or Keras 3 (``{"keras_history": [name, i, j]}``) spelling."""
    if isinstance(nodes, dict):
        if "keras_history" in nodes:
            yield nodes["keras_history"][0]
        else:
            for v in nodes.values():
                yield from _inbound_names(v)
    elif isinstance(nodes, list):
        if len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
            yield nodes[0]
        else:
            for v in nodes:
                yield from _inbound_names(v)


def read_keras_consumers(path: str | Path) -> dict[str, list[str]] | None:
    """Top-level layer name -> class names of the layers that take its output, from the file's
    ``model_config``; None for a weights-only file or a graph this cannot read."""
    h5py = _h5py()
    with h5py.File(Path(path).expanduser(), "r") as f:
        raw = f.attrs.get("model_config")
    try:
        graph = json.loads(_text(raw))["config"]["layers"]
        out: dict[str, list[str]] = {}
        for layer in graph:
            for source in _inbound_names(layer.get("inbound_nodes", [])):
                out.setdefault(source, []).append(str(layer["class_name"]))
        return out
    except (TypeError, ValueError, KeyError):
        return None


def _natural_key(name: str) -> tuple:
    """``dense`` < ``dense_3`` < ``dense_10``: TF numbers default names in creation order."""
    m = re.match(r"^(.*?)(?:_(\d+))?$", name)
    return m.group(1), int(m.group(2) or -1), name


def keras_num_classes(path: str | Path) -> int:
    """Number of identities of a training_model.h5: the output width of its first classifier."""
    dense = [w for w in read_keras_h5(path, values=False) if not w.theta and w.kind == "kernel" and w.value.ndim == 2]
    dense.sort(key=lambda w: _natural_key(w.group))
    if not dense:
        raise KerasWeightsError(f"{path}: no Dense kernel, so not a training_model.h5 of the seed (a notop file?)")
    return int(dense[0].value.shape[1])


@dataclass
class KerasLoadInfo:
    """What a Keras file gave the model: counts for the log and the thetas for the regularizer."""

    source: str
    kind: str  # notop | training_model
    tensors: int = 0  # torch tensors written
    num_classes: int | None = None  # classifier width in the file (training_model)
    classifiers_loaded: bool = False
    thetas: dict[str, float] = field(default_factory=dict)  # model parameter name -> theta
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- assignment


def _to_torch(kind: str, value: np.ndarray, target: torch.Tensor, name: str, torch_name: str) -> torch.Tensor:
    shape = tuple(target.shape)
    if kind == "kernel":  # OIHW -> HWIO, (out, in) -> (in, out): the shape the file must have
        shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape[::-1]
    if tuple(value.shape) != shape:
        raise KerasWeightsError(f"weight '{name}' has shape {tuple(value.shape)}, but {torch_name} needs {shape} in Keras' layout")
    if kind == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T  # HWIO -> OIHW, (in, out) -> (out, in)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def _assign(module: nn.Module, path: str, weights: dict[str, KerasWeight], table: dict[str, str], what: str, layer: str) -> int:
    """Copy ``weights`` (kind -> weight) into ``module``'s tensors; every tensor of ``table`` must be there."""
    n = 0
    for kind, attr in table.items():
        target = getattr(module, attr, None)
        if target is None:
            if kind in weights:
                raise KerasWeightsError(f"weight '{weights[kind].name}' has no counterpart in {path} (no {attr})")
            continue
        if kind not in weights:
            raise KerasWeightsError(f"{what}: the file has no weight '{layer}/{kind}' (for {path}.{attr})")
        w = weights[kind]
        with torch.no_grad():
            target.copy_(_to_torch(kind, w.value, target, w.name, f"{path}.{attr}"))
        n += 1
    return n


def _by_layer(weights: list[KerasWeight]) -> dict[tuple[str, str], dict[str, KerasWeight]]:
    """(group, layer) -> kind -> weight, in file order (dicts keep insertion order)."""
    out: dict[tuple[str, str], dict[str, KerasWeight]] = {}
    for w in weights:
        if not w.theta:
            out.setdefault((w.group, w.layer), {})[w.kind] = w
    return out


def _conv5_groups(groups: list[str], consumers: dict[str, list[str]] | None) -> list[str]:
    """The two conv5 groups as [global, regional] (module docstring: the graph, a name, creation order)."""
    if consumers:
        pooled = [g for g in groups if any("GlobalAveragePooling" in c or "GlobalAvgPool" in c for c in consumers.get(g, []))]
        if len(pooled) == 1:
            return pooled + [g for g in groups if g != pooled[0]]
    named = [g for g in groups if "global" in g.lower()]
    if len(named) == 1:
        return named + [g for g in groups if g != named[0]]
    return sorted(groups, key=_natural_key)


def load_keras_weights(
    model: nn.Module, weights: list[KerasWeight], source: str, consumers: dict[str, list[str]] | None = None
) -> KerasLoadInfo:
    """Write a notop or training-model file's weights into a keras-style ``ReidNet``.

    The model's layout comes from ``model.keras_layers()`` (Keras name -> [(path, module)], two
    entries for conv5 layers when the regional branch exists) and its heads. Returns what was
    loaded; thetas are returned by parameter name for ``apply_keras_thetas``. consumers: the file's
    graph (``read_keras_consumers``), which tells the global conv5 copy from the regional one.
    """
    targets: dict[str, list[tuple[str, nn.Module]]] = model.keras_layers()
    layers = _by_layer(weights)
    backbone = {k: v for k, v in layers.items() if _BACKBONE_LAYER.match(k[1])}
    heads = {k: v for k, v in layers.items() if not _BACKBONE_LAYER.match(k[1])}
    info = KerasLoadInfo(source, "training_model" if any(
        w["kernel"].value.ndim == 2 for w in heads.values() if "kernel" in w) else "notop")
    what = f"{source} does not fit a keras {model.backbone_name}"

    unexpected = sorted({layer for _, layer in backbone} - set(targets))
    if unexpected:
        raise KerasWeightsError(f"{what}: the file has layer '{unexpected[0]}', which this backbone lacks")
    owner: dict[tuple[str, str], str] = {}  # (group, Keras layer) -> module path, for the thetas
    for name, mods in targets.items():
        found = [(g, w) for (g, layer), w in backbone.items() if layer == name]
        if not found:
            first = "kernel" if name.endswith("_conv") else "gamma"
            raise KerasWeightsError(f"{what}: the file has no weight '{name}/{first}' (layer '{name}' is missing)")
        if len(found) == 1:
            found = found * len(mods)  # a notop file: both conv5 copies start from the same weights
        elif len(found) == len(mods):
            order = _conv5_groups([g for g, _ in found], consumers)
            found = sorted(found, key=lambda gw: order.index(gw[0]))
        else:
            raise KerasWeightsError(f"{what}: layer '{name}' appears {len(found)} times, the model has {len(mods)}")
        for (group, w), (path, mod) in zip(found, mods):
            table = _CONV if isinstance(mod, nn.Conv2d) else _BN
            info.tensors += _assign(mod, path, w, table, what, name)
            owner[(group, name)] = path

    if info.kind == "training_model":
        _load_heads(model, heads, info, owner, what)
    elif heads:
        info.notes.append(f"ignored {len(heads)} non-backbone layers of the file")

    for w in weights:
        if not w.theta:
            continue
        key = (w.group, w.layer)
        if key in owner and owner[key] is None:
            continue  # a classifier that kept its initialisation
        path = owner.get(key)
        if path is None or w.kind not in _THETA_KIND:
            raise KerasWeightsError(f"{what}: theta '{w.name}' belongs to no loaded layer")
        if w.value.size != 1:
            raise KerasWeightsError(f"{what}: theta '{w.name}' has shape {w.value.shape}, expected a scalar")
        info.thetas[f"{path}.{_THETA_KIND[w.kind]}"] = float(w.value.reshape(()))
    return info


def _load_heads(model: nn.Module, heads: dict, info: KerasLoadInfo, owner: dict, what: str) -> None:
    """Stripe convs, BN necks and classifiers of a training_model.h5 (classifiers only when the class counts agree)."""
    ordered = sorted(heads.items(), key=lambda kw: _natural_key(kw[0][0]))  # creation order of the groups
    convs = [(k, w) for k, w in ordered if "kernel" in w and w["kernel"].value.ndim == 4]
    necks = [(k, w) for k, w in ordered if "moving_mean" in w]
    dense = [(k, w) for k, w in ordered if "kernel" in w and w["kernel"].value.ndim == 2]
    wide = model.feature_dims[0]
    # the global branch's neck and classifier are the wider ones; stable, so stripes keep their order
    necks.sort(key=lambda kw: kw[1]["gamma"].value.shape[0] != wide if "gamma" in kw[1] else True)
    dense.sort(key=lambda kw: kw[1]["kernel"].value.shape[0] != wide)
    for found, mods, kind in ((convs, model.stripe_convs, "stripe conv"), (necks, model.necks, "BN neck"),
                              (dense, model.classifiers, "classifier")):
        if len(found) != len(mods):
            raise KerasWeightsError(f"{what}: the file has {len(found)} {kind} layers, the model {len(mods)} "
                                    f"(model.region_num={model.region_num})")
    for found, mods, attr, table in ((convs, model.stripe_convs, "stripe_convs", _CONV),
                                     (necks, model.necks, "necks", _BN)):
        for i, ((key, w), mod) in enumerate(zip(found, mods)):
            info.tensors += _assign(mod, f"{attr}.{i}", w, table, what, key[1])
            owner[key] = f"{attr}.{i}"
    info.num_classes = int(dense[0][1]["kernel"].value.shape[1])
    if info.num_classes == model.classifiers[0].out_features:
        for i, ((key, w), mod) in enumerate(zip(dense, model.classifiers)):
            info.tensors += _assign(mod, f"classifiers.{i}", w, {"kernel": "weight"}, what, key[1])
            owner[key] = f"classifiers.{i}"
        info.classifiers_loaded = True
    else:
        info.notes.append(
            f"the file's classifiers have {info.num_classes} classes, the model {model.classifiers[0].out_features}: "
            f"classifiers (and their thetas) keep their initialisation"
        )
        for key, _ in dense:
            owner[key] = None  # their thetas are skipped too


def apply_keras_thetas(regularizer, thetas: dict[str, float]) -> tuple[int, list[str]]:
    """Set the regularizer's thetas from ``KerasLoadInfo.thetas``; (count set, regularized names without one)."""
    names = regularizer.names()
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in thetas if n not in index]
    if unknown:
        raise KerasWeightsError(f"theta for '{unknown[0]}', which is not a regularized tensor of this model")
    with torch.no_grad():
        for name, value in thetas.items():
            regularizer.thetas[index[name]].fill_(value)
    return len(thetas), [n for n in names if n not in thetas]


def keras_imagenet_file(backbone: str, hub_dir: str | Path) -> Path:
    """The Keras ImageNet notop file of ``backbone`` in ``hub_dir``, downloaded there once if missing."""
    url = KERAS_RESNET_URL.format(name=backbone)
    target = Path(hub_dir) / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # no network, proxy, ...
        raise KerasWeightsError(
            f"could not fetch the Keras ImageNet weights of {backbone} ({exc.__class__.__name__}: {exc}).\n"
            f"Download {url} on a machine with internet access and place it at {target}, or pass "
            f"model.pretrained=/path/to/{target.name}, or model.pretrained=none for random init."
        ) from exc
    return target


def load_keras_training_model(path: str | Path, cfg, log=None):
    """The seed's ``training_model.h5`` as an alr-fast task for ``cfg`` (a Config); -> (task, info).

    The number of classes is read from the file. ``cfg.model.backbone_style`` must be keras (the
    recipes ``*_keras``) and ``backbone``/``region_num`` must match the file; every weight of the
    three-branch model, the necks' moving statistics and the thetas are loaded. ``log``: an
    optional ``logging.Logger`` that gets the summary.
    """
    import dataclasses

    from .model import PretrainedWeightsError
    from .task import build_task

    if cfg.model.backbone_style != "keras":
        raise PretrainedWeightsError(
            f"{path} is a Keras model: evaluate it with model.backbone_style=keras (e.g. --config market1501_resnet50_keras)"
        )
    try:
        num_classes = keras_num_classes(path)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(path)))
        task = build_task(cfg, num_classes)
    except KerasWeightsError as exc:
        raise PretrainedWeightsError(str(exc)) from exc
    info = task.model.keras_load_info
    if info is None or info.kind != "training_model":
        raise PretrainedWeightsError(f"{path}: no heads in the file (a notop file?); evaluation needs a training_model.h5")
    if log is not None:
        log.info("%s: %d tensors and %d of %d thetas loaded, %d classes", path, info.tensors, len(info.thetas),
                 len(task.regularizer), num_classes)
    return task, info
