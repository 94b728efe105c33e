"""The GPU-mode DALI graphs (``device_id=0``, ``"mixed"`` decoder), assembled without a GPU.

DALI's Python front end places every operator on a device when the graph is defined, and rejects
a CPU operator fed from the GPU or an argument input that lives on the GPU; running it here checks
the placement of the GPU path on machines without one: image operators on the GPU in the order of
docs/METHOD.md §6.2 (erase on uint8 before the normalisation that casts), per-sample parameters on the CPU,
every output on the GPU. Uses DALI's graph internals (``_build_graph``); skips if they move.
"""
import re

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import types  # noqa: E402

from alr_fast.pipelines import dali  # noqa: E402
from alr_fast.pipelines.jpeg_store import JpegStore  # noqa: E402
from alr_fast.pipelines.sampler import IdentitySampler  # noqa: E402
from alr_fast.pipelines.stream import TrainStream  # noqa: E402

pytestmark = pytest.mark.dali

H, W = 32, 16
GPU_MODE = dict(batch_size=4, num_threads=1, device_id=0, exec_dynamic=True)


def kind(node) -> str:
    """Operator type of a graph node: ``__Erase_22`` -> ``Erase``."""
    return re.fullmatch(r"_+([A-Za-z]+)_\d+", node.source.name).group(1)


def built_graph(pipe):
    try:
        pipe._build_graph()
        return pipe._ops, pipe._graph_outputs
    except AttributeError as err:  # pragma: no cover - depends on DALI's private layout
        pytest.skip(f"DALI's graph internals changed: {err}")


def image_chain(output) -> list[tuple[str, str]]:
    """(operator, device) from the external source to ``output``, following each operator's data input."""
    chain, node = [], output
    while True:
        chain.append((kind(node), node.device))
        if not node.source.inputs:
            return chain[::-1]
        node = node.source.inputs[0]


def store_source(n: int = 8):
    store = JpegStore([f"f{i}" for i in range(n)], [b"\xff\xd8\xff\xd9"] * n)  # never decoded here
    return store, *dali.pack_store(store)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [types.FLOAT, types.FLOAT16])
def test_gpu_train_graph_placement(parallel, dtype):
    store, blob, offsets = store_source()
    labels = np.repeat(np.arange(4), 2)
    stream = TrainStream(IdentitySampler(labels, 2, 2, 2, seed=0), num_images=len(store), seed=0, height=H, width=W)
    pipe = dali.train_pipeline(
        dali._TrainSource(blob, offsets, labels, labels, stream), parallel=parallel, source_prefetch=2,
        decoder_device="mixed", height=H, width=W, pad=10, dtype=dtype, channels_last=True, on_gpu=True,
        bytes_hint=1024, prefetch_queue_depth=2, py_num_workers=2, py_start_method="spawn", **GPU_MODE,
    )
    ops, outputs = built_graph(pipe)
    assert [o.device for o in outputs] == ["gpu", "gpu", "gpu"]  # images, labels, camids
    chain = image_chain(outputs[0])
    assert chain == [("ExternalSource", "cpu")] + [
        (op, "gpu") for op in ("Image", "Resize", "Flip", "Slice", "Erase", "CropMirrorNormalize")
    ]
    on_gpu = {k for k, _ in chain[1:]}
    for op in ops:  # everything else computes the per-sample parameters, on the CPU
        if kind(op.outputs[0]) not in on_gpu:
            assert all(o.device == "cpu" for o in op.outputs), op.name
            for argument in op.inputs:
                assert argument.device == "cpu", f"{op.name} reads {argument.name} on the GPU"


def test_gpu_eval_and_decode_graph_placement():
    store, blob, offsets = store_source()
    source = dali._EvalSource(blob, offsets, np.arange(len(store)), 4)
    _, (images,) = built_graph(
        dali.eval_pipeline(source, decoder_device="mixed", height=H, width=W, dtype=types.FLOAT16,
                           channels_last=True, **GPU_MODE)
    )
    assert image_chain(images) == [("ExternalSource", "cpu"), ("Image", "gpu"), ("Resize", "gpu"),
                                   ("CropMirrorNormalize", "gpu")]
    _, (decoded,) = built_graph(dali.decode_pipeline(source, decoder_device="mixed", height=H, width=W, **GPU_MODE))
    assert image_chain(decoded) == [("ExternalSource", "cpu"), ("Image", "gpu"), ("Resize", "gpu")]
