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


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("adaptive", [True, False])
def test_fused_matches_reference_float64(seed, adaptive):
    net = _random_net(seed)
    reg = AdaptiveL2(net, FACTORS, adaptive=adaptive).double()
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for t in reg.thetas:  # spread over the linear part and both saturated ends
            t.copy_(torch.empty((), dtype=torch.float64).uniform_(-4, 4, generator=g))
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
