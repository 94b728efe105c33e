"""Writers of Keras-layout .h5 files with h5py, for the loader tests.

``read_layout`` takes a file Keras itself wrote; ``write_layout`` writes such a layout back,
optionally in the TF 2.2 spelling of the seed's released files (weight names with ``:0``, TF's
numeric suffixes on layer names, fixed-length byte attributes, long name lists split into
``weight_names0``, ``weight_names1``, ...), with adaptive-L2 thetas added as TF 2.2 named them.
"""
from __future__ import annotations

import re

import numpy as np

Layout = list[tuple[str, list[tuple[str, np.ndarray]]]]  # [(group, [(weight name, value)])]


def read_layout(path) -> Layout:
    """The layer groups of a Keras HDF5 file (root or ``model_weights``) in ``layer_names`` order."""
    import h5py

    out: Layout = []
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for group in root.attrs["layer_names"]:
            group = group.decode() if isinstance(group, bytes) else str(group)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in root[group].attrs["weight_names"]]
            out.append((group, [(n, np.asarray(root[group][n][()])) for n in names]))
    return out


def _attr(values: list[str], as_bytes: bool):
    if as_bytes:  # TF 2.2 + h5py 2.10 wrote fixed-length byte strings
        return np.array([v.encode() for v in values], dtype=f"S{max([len(v) for v in values] + [1])}")
    return np.array(values, dtype=object) if values else np.array([], dtype=np.float64)


def read_model_config(path) -> str | None:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    return raw.decode() if isinstance(raw, bytes) else raw


def write_layout(path, layout: Layout, *, full_model: bool, as_bytes: bool = False, split_over: int = 0,
                 model_config: str | None = None) -> None:
    """Write ``layout``; full_model: under ``model_weights`` (+ an ``optimizer_weights`` group the
    loader must ignore), else at the root as ``save_weights`` does. split_over > 0: name lists
    longer than that are split into numbered attributes. model_config: the graph JSON to keep."""
    import h5py

    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        if full_model:
            f.create_group("optimizer_weights").create_dataset("Adam/iter:0", data=np.int64(7))
            if model_config is not None:
                f.attrs["model_config"] = model_config.encode() if as_bytes else model_config
        root.attrs["layer_names"] = _attr([g for g, _ in layout], as_bytes)
        root.attrs["backend"] = b"tensorflow" if as_bytes else "tensorflow"
        for group, weights in layout:
            g = root.create_group(group)
            names = [n for n, _ in weights]
            if split_over and len(names) > split_over:
                for i in range(0, len(names), split_over):
                    g.attrs[f"weight_names{i // split_over}"] = _attr(names[i : i + split_over], as_bytes)
            else:
                g.attrs["weight_names"] = _attr(names, as_bytes)
            for name, value in weights:
                g.create_dataset(name, data=value)


def tf22_spelling(layout: Layout, thetas: dict[tuple[str, str, str], float]) -> Layout:
    """The same weights spelled as TF 2.2 wrote the seed's files.

    Every layer name gets a numeric suffix (``conv1_conv`` -> ``conv1_conv_1``; the groups' own
    numbering shifts, ``dense`` -> ``dense_3``), a second copy of a layer name in another group
    the next suffix (the two conv5 copies), ``:0`` ends every name, and each theta of ``thetas``
    ((group, layer, kind) -> value, in the original spelling) becomes a scalar
    ``<layer>/<kind>/Regularizer/adaptive_l1_l2/l2_regularization_factor:0`` in its layer's group.
    """
    seen: dict[str, int] = {}

    def renamed(layer: str) -> str:
        head = re.match(r"^(dense|batch_normalization|conv2d)(?:_(\d+))?$", layer)
        if head:  # default names: TF 2.2 numbered on from the layers of the models built before
            return f"{head.group(1)}_{int(head.group(2) or 0) + 3}"
        seen[layer] = seen.get(layer, 0) + 1  # the second conv5 copy gets the next suffix
        return f"{layer}_{seen[layer]}"

    out: Layout = []
    for group, weights in layout:
        new_group = group
        layer_map: dict[str, str] = {}
        new_weights = []
        for name, value in weights:
            layer, kind = name.rsplit("/", 1)
            kind = kind.split(":")[0]
            if layer not in layer_map:
                layer_map[layer] = renamed(layer)
            new_weights.append((f"{layer_map[layer]}/{kind}:0", value))
        for (g, layer, kind), theta in thetas.items():
            if g == group:
                new_weights.append(
                    (f"{layer_map[layer]}/{kind}/Regularizer/adaptive_l1_l2/l2_regularization_factor:0", np.float32(theta))
                )
        if len(layer_map) == 1 and group in layer_map:  # a head layer: its group is named like the layer
            new_group = layer_map[group]
        out.append((new_group, new_weights))
    return out


def layout_from_model(model) -> Layout:
    """A keras-style ``ReidNet`` written back in the seed's layout (HWIO kernels, (in, out) dense):
    the stem and conv2..conv4 in group ``model``, the conv5 copies in ``model_4`` / ``model_5``,
    each head layer in its own group with Keras' default names. No graph: the loader falls back to
    creation order for the conv5 copies. For loader tests that need no TensorFlow."""
    import torch

    def conv(name, mod):
        w = mod.weight.detach().numpy().transpose(2, 3, 1, 0)
        return [(f"{name}/kernel", w)] + ([(f"{name}/bias", mod.bias.detach().numpy())] if mod.bias is not None else [])

    def bn(name, mod):
        return [(f"{name}/gamma", mod.weight.detach().numpy()), (f"{name}/beta", mod.bias.detach().numpy()),
                (f"{name}/moving_mean", mod.running_mean.numpy()), (f"{name}/moving_variance", mod.running_var.numpy())]

    groups: dict[str, list] = {"model": [], "model_4": [], "model_5": []}
    for name, entries in model.keras_layers().items():
        for (path, mod), group in zip(entries, ("model_4", "model_5") if name.startswith("conv5") else ("model",)):
            groups[group] += conv(name, mod) if isinstance(mod, torch.nn.Conv2d) else bn(name, mod)
    layout: Layout = [(g, w) for g, w in groups.items()]
    for i, c in enumerate(model.stripe_convs):
        name = "conv2d" + (f"_{i}" if i else "")
        layout.append((name, conv(name, c)))
    for i, n in enumerate(model.necks):
        name = "batch_normalization" + (f"_{i}" if i else "")
        layout.append((name, bn(name, n)))
    for i, fc in enumerate(model.classifiers):
        name = "dense" + (f"_{i}" if i else "")
        layout.append((name, [(f"{name}/kernel", fc.weight.detach().numpy().T.copy())]))
    return layout
