"""The fused adaptive-L2 penalty equals the per-tensor reference, value and gradients."""
import pytest
import torch
from torch import nn

from alr_fast.model import ReidNet
from alr_fast.regularizer import (
    AdaptiveL2,
    hard_sigmoid,
    penalty_fused,
    penalty_reference,
    regularized_tensors,
)

FACTORS = dict(kernel=0.005, bias=0.005, gamma=0.005, beta=0.005)


def _random_net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    width = int(torch.randint(2, 7, (1,), generator=g))
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, bias=True),
        nn.BatchNorm2d(width),
        nn.Conv2d(width, width * 2, 1, bias=False),
        nn.BatchNorm2d(width * 2),
        nn.Flatten(),
        nn.Linear(width * 2, 5, bias=bool(seed % 2)),
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def _random_regularized_net(seed: int, adaptive: bool, theta_seed: int):
    """A random float64 net, its AdaptiveL2, and the generator that drew the thetas."""
    net = _random_net(seed)
    reg = AdaptiveL2(net, FACTORS, adaptive=adaptive).double()
    g = torch.Generator().manual_seed(theta_seed)
    with torch.no_grad():
        for t in reg.thetas:  # spread over the linear part and both saturated ends
            t.copy_(torch.empty((), dtype=torch.float64).uniform_(-4, 4, generator=g))
    return net, reg, g


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("adaptive", [True, False])
def test_fused_matches_reference_float64(seed, adaptive):
    net, reg, g = _random_regularized_net(seed, adaptive, theta_seed=100 + seed)
    weights = reg._weights
    thetas = list(reg.thetas)
    amps = reg.amplitudes * torch.rand(len(reg), generator=g, dtype=torch.float64) * 2

    params = weights + (thetas if adaptive else [])
    ref = penalty_reference(weights, thetas, amps, adaptive)
    ref.backward()
    ref_grads = _grads(params)
    for p in params:
        p.grad = None
    fused = penalty_fused(weights, thetas, amps, adaptive)
    fused.backward()
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=0)
    for a, b in zip(_grads(params), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    if adaptive:  # saturated thetas get no gradient, linear ones get 0.2*A*sum(W^2)
        for w, t, amp in zip(weights, thetas, amps):
            pre = 0.2 * t.detach() + 0.5
            expect = 0.2 * amp * w.detach().pow(2).sum() if 0 <= pre <= 1 else torch.zeros((), dtype=torch.float64)
            torch.testing.assert_close(t.grad, expect, rtol=1e-9, atol=0)


def test_penalty_formula_by_hand():
    w1 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)  # sum sq 5
    w2 = torch.tensor([[3.0]], dtype=torch.float64, requires_grad=True)  # sum sq 9
    th = [torch.tensor(0.0, dtype=torch.float64, requires_grad=True),
          torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)]
    amps = torch.tensor([0.005, 0.01], dtype=torch.float64)
    value = penalty_fused([w1, w2], th, amps)
    # 0.005*0.5*5 + 0.01*0.3*9
    assert value.item() == pytest.approx(0.0125 + 0.027, rel=1e-12)
    value.backward()
    torch.testing.assert_close(w1.grad, 2 * 0.005 * 0.5 * w1.detach())
    assert th[0].grad.item() == pytest.approx(0.2 * 0.005 * 5)
    assert th[1].grad.item() == pytest.approx(0.2 * 0.01 * 9)


def test_hard_sigmoid_is_tf22():
    x = torch.tensor([-3.0, -2.5, 0.0, 1.0, 2.5, 3.0])
    torch.testing.assert_close(hard_sigmoid(x), torch.tensor([0.0, 0.0, 0.5, 0.7, 1.0, 1.0]))


def test_frozen_weights_contribute_value_but_no_gradient():
    net = _random_net(3)
    reg = AdaptiveL2(net, FACTORS).double()
    net[0].requires_grad_(False)
    reg.sync_requires_grad()
    frozen = [t for w, t in zip(reg._weights, reg.thetas) if not w.requires_grad]
    assert len(frozen) == 2 and all(not t.requires_grad for t in frozen)
    value = reg()
    expected = sum(0.005 * 0.5 * w.detach().pow(2).sum() for w in reg._weights)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    value.backward()
    assert net[0].weight.grad is None and net[2].weight.grad is not None


def test_negative_factor_disables_a_kind():
    net = _random_net(1)
    reg = AdaptiveL2(net, dict(FACTORS, bias=-1.0, gamma=-1.0))
    kinds = {e.kind for e in reg.entries}
    assert kinds == {"kernel", "beta"}


@pytest.mark.parametrize(
    "backbone,expected",
    [("resnet50", 202), ("resnet101", 355), ("resnet152", 508)],
)
def test_tensor_counts_match_the_seed_less_conv_biases(backbone, expected):
    """The seed counts 265/469/673 with Caffe convs that carry biases: one bias per conv more."""
    net = ReidNet(10, backbone)
    entries = regularized_tensors(net)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert len(entries) == expected
    seed_count = len(entries) + (n_convs - 2)  # the 2 stripe convs already have biases
    assert seed_count == {"resnet50": 265, "resnet101": 469, "resnet152": 673}[backbone]


def test_fused_float32_gradients_close_to_reference():
    net = ReidNet(7, "resnet18", region_num=2)
    reg = AdaptiveL2(net, FACTORS)
    with torch.no_grad():
        for i, t in enumerate(reg.thetas):
            t.fill_((i % 7) - 3.0)
    w, t = reg._weights, list(reg.thetas)
    ref = penalty_reference(w, t, reg.amplitudes.float())
    ref.backward()
    ref_grads = _grads(w + t)
    for p in w + t:
        p.grad = None
    out = penalty_fused(w, t, reg.amplitudes.float())
    out.backward()
    # float32 norm accumulation differs between foreach (CPU: near-sequential) and pow().sum()
    # (pairwise): up to ~1e-4 relative on million-element tensors; weight gradients are exact
    torch.testing.assert_close(out, ref, rtol=3e-4, atol=0)
    grads = _grads(w + t)
    for a, b in zip(grads[: len(w)], ref_grads[: len(w)]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    for a, b in zip(grads[len(w):], ref_grads[len(w):]):
        torch.testing.assert_close(a, b, rtol=3e-4, atol=1e-12)


def _deferred_vs_reference(net, reg, grad_scale=None, seed=0):
    """Gradients of task + penalty: reference autograd vs deferred (thetas by autograd, weights
    by add_weight_grads); returns both lists over every trainable parameter of net and reg."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)  # 3x3 conv -> 1x1
    params = [p for p in list(net.parameters()) + list(reg.parameters()) if p.requires_grad]
    out = []
    for mode in ("reference", "deferred"):
        for p in params:
            p.grad = None
        reg.implementation, reg.defer_weight_grads = ("reference", False) if mode == "reference" else ("fused", True)
        loss = net(x).square().mean() + reg()
        (loss if grad_scale is None else loss * grad_scale).backward()
        if mode == "deferred":
            reg.add_weight_grads(grad_scale)
        out.append([p.grad.clone() for p in params])
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("adaptive", [True, False])
def test_deferred_weight_grads_match_reference_float64(seed, adaptive):
    net, reg, _ = _random_regularized_net(seed, adaptive, theta_seed=50 + seed)
    if seed % 2:  # a frozen first layer: no gradient for it or its thetas, the rest unchanged
        net[0].requires_grad_(False)
        net[1].requires_grad_(False)
        reg.sync_requires_grad()
    scale = torch.tensor(1024.0, dtype=torch.float64) if seed >= 2 else None
    ref, got = _deferred_vs_reference(net, reg, scale, seed)
    assert len(ref) == len(got) > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if seed % 2:
        assert net[0].weight.grad is None


def test_deferred_value_equals_fused_and_theta_only_graph():
    net = _random_net(2)
    reg = AdaptiveL2(net, FACTORS).double()
    with torch.no_grad():
        for i, t in enumerate(reg.thetas):
            t.fill_(i - 2.0)
    full = reg()
    reg.defer_weight_grads = True
    value = reg()
    torch.testing.assert_close(value, full, rtol=1e-12, atol=0)
    value.backward()
    assert all(w.grad is None for w in reg._weights)
    assert all(t.grad is not None for t in reg.thetas)
    reg.implementation = "reference"
    with pytest.raises(ValueError, match="fused"):
        reg()


def test_deferred_grads_for_weights_the_network_did_not_use():
    net = _random_net(4)
    reg = AdaptiveL2(net, FACTORS).double()
    reg.defer_weight_grads = True
    reg().backward()  # only the penalty: every weight gradient comes from add_weight_grads
    reg.add_weight_grads()
    for w, amp in zip(reg._weights, reg.amplitudes):
        torch.testing.assert_close(w.grad, 2 * amp * 0.5 * w.detach())


def test_spread_views_pair_with_channels_last_weights_and_grads():
    """The multi-tensor fast path of _foreach_addcmul_ needs the three lists to agree in shape
    and strides tensor by tensor; channels_last weights (as the GPU trainer uses) included."""
    net = ReidNet(7, "resnet18", region_num=2).to(memory_format=torch.channels_last)
    reg = AdaptiveL2(net, FACTORS)
    reg.defer_weight_grads = True
    x = torch.randn(2, 3, 64, 32).contiguous(memory_format=torch.channels_last)
    feats, logits = net(x)
    (sum(f.sum() for f in feats) + sum(lg.sum() for lg in logits) + reg()).backward()
    reg.add_weight_grads()
    views = reg._spread[1].views
    assert sum(v.numel() for v in views) == reg._spread[1].flat.numel()
    assert any(w.dim() == 4 and not w.is_contiguous() for w in reg._weights)  # really channels_last
    for v, w in zip(views, reg._weights):
        assert v.shape == w.shape and v.stride() == w.stride() == w.grad.stride()
    # the buffer holds 2*A*hs(theta) of each tensor over exactly that tensor's elements
    for v, amp in zip(views, reg.amplitudes.float()):
        assert torch.all(v == 2 * amp * 0.5)


def _dispatched_ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        fn()
    return mode.ops


def test_deferred_penalty_op_count_does_not_grow_with_tensors():
    """Forward value, theta backward and the weight gradients dispatch the same kernels for a
    small and a 202-tensor model: the launch count on a GPU does not grow with n."""
    counts = []
    for backbone in ("resnet18", "resnet50"):
        net = ReidNet(5, backbone, region_num=2)
        reg = AdaptiveL2(net, FACTORS)
        reg.defer_weight_grads = True
        for w in reg._weights:
            w.grad = torch.zeros_like(w)
        reg.add_weight_grads()  # first call builds the cached buffer and views

        def step():
            for t in reg.thetas:  # as after the Trainer's zero_grad(set_to_none=True)
                t.grad = None
            reg().backward()
            reg.add_weight_grads(torch.tensor(2.0))

        ops = _dispatched_ops(step)
        assert "aten._foreach_addcmul_" in ops and "aten._foreach_norm" in ops
        # the engine hands each theta its slice of the stacked gradient as a view (select, then
        # detach when it becomes .grad): metadata only, no kernel
        launching = [op for op in ops if op not in ("aten.select", "aten.detach")]
        assert ops.count("aten.select") == len(reg)
        counts.append((len(reg), launching))
    (n_small, small), (n_large, large) = counts
    assert n_large > 2 * n_small
    assert sorted(small) == sorted(large)
    assert len(large) < 40


class _RecordGrads(torch.optim.SGD):
    """Records the gradients the optimizer is handed (after the GradScaler unscaled them)."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trainer_step_hands_the_optimizer_reference_gradients(precision):
    """The Trainer's fused step (deferred weight gradients, scaled like the loss under fp16's
    GradScaler) gives the optimizer the gradients of the per-tensor reference penalty."""
    from alr_fast.task import ReidTask
    from alr_fast.trainer import Trainer

    seen = {}
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        net = ReidNet(4, "resnet18", region_num=2)
        reg = AdaptiveL2(net, FACTORS, implementation=impl)
        with torch.no_grad():
            for i, t in enumerate(reg.thetas):
                t.fill_((i % 5) - 2.0)
        task = ReidTask(net, reg)
        opt = _RecordGrads(task.parameters(), lr=0.0)
        trainer = Trainer(task, opt, device=torch.device("cpu"), precision=precision)
        if trainer.scaler.is_enabled():  # 2^16 overflows this model's fp16 gradients on step 0
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        assert reg.defer_weight_grads == (impl == "fused")
        task.train()
        g = torch.Generator().manual_seed(1)
        batch = (torch.randn(8, 3, 64, 32, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), None)
        trainer.train_step(batch)
        seen[impl] = opt.seen
    assert len(seen["fused"]) == len(seen["reference"]) == len(list(task.parameters()))
    for a, b in zip(seen["fused"], seen["reference"]):
        # theta gradients 0.2*A*sum(W^2): float32 norms accumulate in another order (see above)
        torch.testing.assert_close(a, b, rtol=3e-4 if a.dim() == 0 else 1e-5, atol=1e-7)
