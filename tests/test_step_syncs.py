"""Nothing in Trainer.train_step makes the host wait for the GPU.

On a GPU, ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``nonzero``, boolean-mask indexing,
``unique`` or ``repeat_interleave`` without ``output_size`` block the host until the device has
caught up: launches stop running ahead, and CUDA-graph capture fails. A CPU run dispatches the
same aten ops, so a TorchDispatchMode that records them catches these in forward, backward,
penalty and optimizer without a GPU. The optimizer is fused Adam, as on a GPU (build_optimizer);
CPU's for-loop Adam reads its step counters with ``_local_scalar_dense``, which the last CPU test
uses to show that the recorder does see such an op. The gpu-marked test runs the real thing
under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alr_fast.model import ReidNet
from alr_fast.profiling import Regions
from alr_fast.regularizer import AdaptiveL2
from alr_fast.task import ReidTask
from alr_fast.trainer import Trainer, build_optimizer

FACTORS = dict(kernel=0.005, bias=0.005, gamma=0.005, beta=0.005)
OPTIM = type("O", (), dict(lr_base=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-7))()
LABELS = [0, 0, 1, 1, 2, 2, 3, 3]

aten = torch.ops.aten
# ops whose CUDA implementation copies a value (or a size that depends on values) to the host
SYNC_OPS = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.argwhere,
    aten.masked_select, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
    aten.bincount, aten.histc,
    # torch.tensor(python data) inside the step: a copy from pageable host memory
    aten.lift_fresh, aten.lift_fresh_copy,
}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` would wait for a CUDA device, or None."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return str(func)
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return f"{func} without output_size"
    if packet in INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return f"{func} with a boolean mask"
    target = kwargs.get("device")
    if packet is aten._to_copy and target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
        return f"{func} to the host"  # only seen when the recorder runs on a GPU
    return None


class _TaggedRegions(Regions):
    """The Trainer's named regions, remembering which one is open."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.open = ["step"]

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.open.append(name)
        try:
            yield
        finally:
            self.open.pop()


class _RecordOps(TorchDispatchMode):
    def __init__(self, regions: _TaggedRegions) -> None:
        super().__init__()
        self.regions = regions
        self.ops: dict[str, set[str]] = {}
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        region = self.regions.open[-1]
        self.ops.setdefault(region, set()).add(str(func.overloadpacket))
        reason = sync_reason(func, args, kwargs)
        if reason:
            self.syncs.append(f"{region}: {reason}")
        return func(*args, **kwargs)


def _trainer(precision: str, fused_adam: bool = True, device: str = "cpu", compile_mode: str = "none"):
    torch.manual_seed(0)
    dev = torch.device(device)
    net = ReidNet(4, "resnet18")
    task = ReidTask(net, AdaptiveL2(net, FACTORS)).to(dev)  # the thetas too, not only the network
    if dev.type == "cuda":
        task.model.to(memory_format=torch.channels_last)
        opt = build_optimizer(task, OPTIM, dev)
    else:  # CPU Adam has a fused kernel too; build_optimizer keeps the CPU's default implementation
        opt = torch.optim.Adam(task.parameters(), lr=OPTIM.lr_base, eps=OPTIM.adam_eps, fused=fused_adam)
    regions = _TaggedRegions()
    trainer = Trainer(task, opt, device=dev, precision=precision, regions=regions, compile_mode=compile_mode)
    if trainer.scaler.is_enabled():  # 2^16 overflows this model's fp16 gradients on step 0
        trainer.scaler = torch.amp.GradScaler(dev.type, init_scale=256.0)
    task.train()
    return trainer, regions


def _batch(step: int, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    images = torch.randn(8, 3, 64, 32, generator=g).to(device, dtype)
    if device != "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor(LABELS, device=device)
    return images, labels, torch.zeros_like(labels)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_step_dispatches_no_host_sync(precision):
    trainer, regions = _trainer(precision)
    trainer.train_step(_batch(0))  # first step: optimizer state, scaler and penalty buffers are built
    batches = [_batch(s) for s in (1, 2)]
    with _RecordOps(regions) as rec:
        losses = [trainer.train_step(b) for b in batches]
    assert rec.syncs == []
    # the recording covered every part of the step
    assert "aten.convolution" in rec.ops["forward"] and "aten.convolution_backward" in rec.ops["backward"]
    # the penalty: its value in the forward, its weight gradients after backward
    assert {"aten._foreach_norm", "aten._foreach_addcmul_"} <= rec.ops["regularizer"]
    assert "aten._fused_adam_" in rec.ops["optimizer"]
    if precision == "fp16":
        assert "aten._amp_foreach_non_finite_check_and_unscale_" in rec.ops["optimizer"]
    for out in losses:
        assert set(out) == {*(f"ce_{i}" for i in range(3)), *(f"triplet_{i}" for i in range(3)), "regularization", "total"}
        assert all(math.isfinite(float(v)) for v in out.values())
        parts = sum(float(v) for k, v in out.items() if k != "total")
        assert float(out["total"]) == pytest.approx(parts, rel=1e-5)
    assert float(losses[0]["total"]) != float(losses[1]["total"])


def test_recorder_sees_the_for_loop_adam_reading_its_step_counters():
    """CPU's default Adam reads each parameter's step with .item(): the recorder must name it,
    in the optimizer region only."""
    trainer, regions = _trainer("fp32", fused_adam=False)
    trainer.train_step(_batch(0))
    batch = _batch(1)
    with _RecordOps(regions) as rec:
        trainer.train_step(batch)
    n = len(list(trainer.task.parameters()))
    assert rec.syncs.count("optimizer: aten._local_scalar_dense.default") >= n
    assert {s.split(":")[0] for s in rec.syncs} == {"optimizer"}


def test_sync_reason_flags_mask_indexing_and_unsized_repeat_interleave():
    regions = _TaggedRegions()
    x = torch.randn(6)
    with _RecordOps(regions) as rec:
        x[x > 0].sum()
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]))
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        x[torch.tensor([0, 2])].sum()
        bool(x.sum() > 0)
    assert rec.syncs == [
        "step: aten.index.Tensor with a boolean mask",
        "step: aten.lift_fresh.default", "step: aten.lift_fresh.default",
        "step: aten.repeat_interleave.Tensor without output_size",
        "step: aten.lift_fresh.default", "step: aten.lift_fresh.default",
        "step: aten.lift_fresh.default",
        "step: aten._local_scalar_dense.default",
    ]


def test_gradients_are_freed_before_the_forward():
    """The last step's gradients must not be alive during the next forward: they would add a copy
    of the parameters to the activation peak (and alias CUDA-graph memory under capture)."""
    trainer, _ = _trainer("fp32")
    trainer.train_step(_batch(0))
    assert all(p.grad is not None for p in trainer.task.parameters() if p.requires_grad)
    seen = []
    handle = trainer.task.model.register_forward_pre_hook(
        lambda *_: seen.append(sum(p.grad is not None for p in trainer.task.parameters())))
    try:
        trainer.train_step(_batch(1))
    finally:
        handle.remove()
    assert seen == [0]


@pytest.mark.gpu
@pytest.mark.parametrize("precision,compile_mode", [("bf16", "none"), ("fp16", "none"), ("bf16", "reduce-overhead")])
def test_cuda_train_step_never_synchronizes(precision, compile_mode):
    """Fused bf16 (and fp16 with the GradScaler) steps on a GPU, eager and captured in CUDA
    graphs, under torch.cuda.set_sync_debug_mode("error"): any synchronising call raises."""
    from torch._dynamo.utils import counters

    counters["inductor"].clear()
    trainer, _ = _trainer(precision, device="cuda", compile_mode=compile_mode)
    assert trainer.optimizer.defaults["fused"] is True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    batches = [_batch(s, "cuda", dtype) for s in range(6)]
    for b in batches[:3]:  # lazy state, compilation, CUDA-graph warm-up and recording
        trainer.train_step(b)
    torch.cuda.synchronize()
    totals = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[3:]:
            totals.append(trainer.train_step(b)["total"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = torch.stack(totals).tolist()
    assert all(math.isfinite(v) for v in values) and len(set(values)) == 3
    if compile_mode != "none":
        assert counters["inductor"]["cudagraph_skips"] == 0  # the step really was captured
    conv = trainer.task.model.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.grad.is_contiguous(memory_format=torch.channels_last)
