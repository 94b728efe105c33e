"""Adaptive L2 regularization (docs/METHOD.md §3; the fused form §3.6).

For every regularized tensor W (conv/linear kernels, conv biases, BN gamma and beta) there is one
trainable scalar theta_W, initialised to 0, and the loss gains

    R = sum_W  A_W * hs(theta_W) * sum(W^2),     hs(x) = clip(0.2 * x + 0.5, 0, 1)

(``adaptive=False``: the constant-L2 ablation, R = sum_W A_W * sum(W^2)). The thetas are ordinary
parameters, trained by the same Adam at the same learning rate, and frozen with their layer.

Two implementations with one signature, ``penalty(weights, thetas) -> 0-d tensor``:

* ``penalty_reference``: a plain Python loop of per-tensor ops, one autograd node per tensor. It
  is the specification in code and the baseline of the benchmarks.
* ``penalty_fused``: one multi-tensor norm over all tensors (apex ``multi_tensor_l2norm`` when apex
  is importable and the tensors are on a GPU, ``torch._foreach_norm`` otherwise) inside a single
  autograd node whose backward hands 2*A*hs(theta)*W to every weight and gives
  dR/dtheta = 0.2*A*sum(W^2) inside the linear part of hs (0 where it saturates).

Handing a gradient to each of n weights through autograd costs the engine one add per tensor
(it sums the penalty's and the network's contribution per parameter), so the Trainer uses the
fused penalty in its *deferred* form (``AdaptiveL2.defer_weight_grads``): the forward pass keeps
only the thetas in the autograd graph (norms detached), and after ``backward()``
``AdaptiveL2.add_weight_grads`` adds 2*A*hs(theta)*W to all weight gradients at once: one
``index_select`` spreads the n coefficients over a persistent flat buffer whose per-tensor views
share each weight's shape and strides, and one ``torch._foreach_addcmul_`` updates every gradient.
The number of kernel launches of the norm, the value, the theta gradients and the weight
gradients does not grow with the number of tensors, and nothing synchronises with the host.

All forms agree to 1e-6 relative in float64 (tests/test_regularizer.py). Accumulation is float32
for float32 parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("kernel", "bias", "gamma", "beta")
HS_SLOPE, HS_OFFSET = 0.2, 0.5


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """TF 2.2 ``K.hard_sigmoid``: clip(0.2 x + 0.5, 0, 1) (not the later relu6(x+3)/6)."""
    return (HS_SLOPE * x + HS_OFFSET).clamp(0.0, 1.0)


def _apex_l2norm():
    try:  # optional: apex's fused multi-tensor norm
        import amp_C  # type: ignore
        from apex.multi_tensor_apply import multi_tensor_applier  # type: ignore
    except Exception:
        return None
    return amp_C, multi_tensor_applier


def multi_tensor_sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum(W^2) of every tensor, as one [n] tensor, with one fused multi-tensor norm."""
    # apex's extension call is opaque to torch.compile (it would split the captured graph): there
    # the traced _foreach_norm below is fused by inductor anyway
    if tensors and tensors[0].is_cuda and tensors[0].dtype == torch.float32 and not torch.compiler.is_compiling():
        apex = _apex_l2norm()
        if apex is not None:
            amp_C, applier = apex
            noop = torch.zeros(1, dtype=torch.int, device=tensors[0].device)
            _, per_tensor = applier(amp_C.multi_tensor_l2norm, noop, [tensors], True)
            return per_tensor.float().square()
    # Accumulation is in the parameters' dtype. On a CPU torch sums float32 norms nearly
    # sequentially (7e-5 relative error measured on a 1.2M-element tensor; float64 accumulation
    # would cost 16x the time, 660 ms per step for ResNet-50). Only the penalty's value and the
    # theta gradients (which Adam normalises) see this; the weight gradients 2*A*hs(theta)*W do not.
    return torch.stack(torch._foreach_norm(tensors, 2)).square()


def penalty_reference(
    weights: list[torch.Tensor], thetas: list[torch.Tensor], amplitudes: torch.Tensor, adaptive: bool = True
) -> torch.Tensor:
    """The per-tensor loop: sum_i A_i * hs(theta_i) * sum(W_i^2)."""
    total = weights[0].new_zeros(())
    for w, theta, amp in zip(weights, thetas, amplitudes.unbind()):
        factor = amp * hard_sigmoid(theta) if adaptive else amp
        total = total + factor * w.pow(2).sum()
    return total


class _FusedPenalty(torch.autograd.Function):
    """One autograd node for the whole penalty; inputs are (amplitudes, adaptive, n, *W, *theta)."""

    @staticmethod
    def forward(ctx, amplitudes: torch.Tensor, adaptive: bool, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        weights, thetas = tensors[:n], tensors[n:]
        sumsq = multi_tensor_sumsq(list(weights)).to(amplitudes.dtype)
        if adaptive:
            pre = HS_SLOPE * torch.stack(thetas).to(amplitudes.dtype) + HS_OFFSET
            coef = amplitudes * pre.clamp(0.0, 1.0)
            # torch.clamp passes the gradient on the closed interval; do the same
            live = (pre >= 0.0) & (pre <= 1.0)
        else:
            coef, live = amplitudes, None
        ctx.adaptive, ctx.n = adaptive, n
        ctx.save_for_backward(amplitudes, coef, sumsq, *( [live] if adaptive else [] ), *weights)
        return (coef * sumsq).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        n = ctx.n
        saved = ctx.saved_tensors
        amplitudes, coef, sumsq = saved[:3]
        live = saved[3] if ctx.adaptive else None
        weights = saved[4:] if ctx.adaptive else saved[3:]
        needs_w = ctx.needs_input_grad[3 : 3 + n]
        grads_w: list[torch.Tensor | None] = [None] * n
        idx = [i for i in range(n) if needs_w[i]]
        if idx:
            scale = (2.0 * grad_out * coef).unbind()
            scaled = torch._foreach_mul([weights[i] for i in idx], [scale[i].to(weights[i].dtype) for i in idx])
            for i, g in zip(idx, scaled):
                grads_w[i] = g
        grads_t: list[torch.Tensor | None] = [None] * n
        if ctx.adaptive and any(ctx.needs_input_grad[3 + n :]):
            g_theta = grad_out * amplitudes * HS_SLOPE * sumsq * live
            grads_t = list(g_theta.unbind())
        return (None, None, None, *grads_w, *grads_t)


def penalty_fused(
    weights: list[torch.Tensor], thetas: list[torch.Tensor], amplitudes: torch.Tensor, adaptive: bool = True
) -> torch.Tensor:
    """Same value and gradients as ``penalty_reference``, one fused norm and one autograd node."""
    return _FusedPenalty.apply(amplitudes, adaptive, len(weights), *weights, *thetas)


def penalty_coefficients(thetas: list[torch.Tensor], amplitudes: torch.Tensor, adaptive: bool = True) -> torch.Tensor:
    """A_i * hs(theta_i) per tensor ([n]; A for the constant-L2 ablation)."""
    return amplitudes * hard_sigmoid(torch.stack(thetas).to(amplitudes.dtype)) if adaptive else amplitudes


def penalty_deferred(
    weights: list[torch.Tensor], thetas: list[torch.Tensor], amplitudes: torch.Tensor, adaptive: bool = True
) -> torch.Tensor:
    """The fused penalty's value and theta gradients; the weights are not in the autograd graph.

    Their gradients 2*A*hs(theta)*W are added after ``backward()`` by
    ``AdaptiveL2.add_weight_grads`` (one multi-tensor op instead of one autograd add per tensor).
    """
    with torch.no_grad():
        sumsq = multi_tensor_sumsq(list(weights)).to(amplitudes.dtype)
    return (penalty_coefficients(thetas, amplitudes, adaptive) * sumsq).sum()


PENALTIES = {"fused": penalty_fused, "reference": penalty_reference}


class _SpreadCoefficients:
    """A flat buffer with one view per weight (the weight's shape and strides), so that one
    ``index_select`` writes every tensor's coefficient over all its elements and the views pair
    element for element with the weights and their gradients in ``torch._foreach_addcmul_``
    (whose multi-tensor fast path needs equal shapes and strides across its lists)."""

    def __init__(self, weights: list[torch.Tensor], indices: list[int]) -> None:
        device, dtype = weights[0].device, weights[0].dtype
        if any(w.device != device or w.dtype != dtype for w in weights):
            raise ValueError("regularized tensors must share one device and dtype; got "
                             f"{sorted({(str(w.device), str(w.dtype)) for w in weights})}")
        sizes = torch.tensor([w.numel() for w in weights], device=device)
        total = int(sum(w.numel() for w in weights))
        index_dtype = torch.int32 if total < 2**31 else torch.int64
        owners = torch.tensor(indices, device=device, dtype=index_dtype)
        # built once per set of trainable tensors; output_size keeps repeat_interleave sync-free
        self.segment = torch.repeat_interleave(owners, sizes, output_size=total)
        self.flat = torch.empty(total, device=device, dtype=dtype)
        self.views, offset = [], 0
        for w in weights:
            dense = w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)
            stride = w.stride() if dense else torch.empty(w.shape, device="meta").stride()
            self.views.append(self.flat.as_strided(w.shape, stride, offset))
            offset += w.numel()


@dataclass(frozen=True)
class RegularizedTensor:
    name: str  # parameter name in the model, e.g. "layer1.0.conv1.weight"
    kind: str  # kernel | bias | gamma | beta


def regularized_tensors(model: nn.Module) -> list[RegularizedTensor]:
    """Every conv/linear kernel and bias and every BN gamma/beta, in module order (docs/METHOD.md §3.2)."""
    out = []
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            out.append(RegularizedTensor(prefix + "weight", "kernel"))
            if mod.bias is not None:
                out.append(RegularizedTensor(prefix + "bias", "bias"))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
            out.append(RegularizedTensor(prefix + "weight", "gamma"))
            out.append(RegularizedTensor(prefix + "bias", "beta"))
    return out


class AdaptiveL2(nn.Module):
    """Holds one theta per regularized tensor of ``model`` and computes the penalty.

    ``factors`` maps kind -> amplitude A; a negative amplitude leaves that kind unregularized
    (the seed's flags). ``implementation`` is "fused" or "reference".
    """

    def __init__(
        self,
        model: nn.Module,
        factors: dict[str, float],
        adaptive: bool = True,
        implementation: str = "fused",
    ) -> None:
        super().__init__()
        if implementation not in PENALTIES:
            raise ValueError(f"implementation must be one of {', '.join(PENALTIES)}; got {implementation!r}")
        params = dict(model.named_parameters())
        self.entries = [e for e in regularized_tensors(model) if factors.get(e.kind, -1.0) >= 0.0]
        self._model = [model]  # a list keeps the model out of this module's parameters
        self.adaptive = adaptive
        self.implementation = implementation
        self.thetas = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.entries)
        self.register_buffer(
            "amplitudes", torch.tensor([factors[e.kind] for e in self.entries], dtype=torch.float64), persistent=False
        )
        self._weights = [params[e.name] for e in self.entries]
        self.defer_weight_grads = False  # the Trainer turns this on for the fused implementation
        self._spread: tuple[tuple, _SpreadCoefficients] | None = None
        if not adaptive:
            for t in self.thetas:
                t.requires_grad_(False)

    def __len__(self) -> int:
        return len(self.entries)

    def sync_requires_grad(self) -> None:
        """A theta trains exactly when its tensor does (frozen with its layer in phase A)."""
        for w, t in zip(self._weights, self.thetas):
            t.requires_grad_(self.adaptive and w.requires_grad)

    def forward(self) -> torch.Tensor:
        """The penalty R (0-d). With ``defer_weight_grads`` only the thetas get gradients from
        ``R.backward()``; call ``add_weight_grads`` afterwards for the weights' part."""
        amps = self.amplitudes.to(self._weights[0].dtype)
        if self.defer_weight_grads:
            if self.implementation != "fused":
                raise ValueError("defer_weight_grads needs implementation='fused'")
            return penalty_deferred(self._weights, list(self.thetas), amps, self.adaptive)
        return PENALTIES[self.implementation](self._weights, list(self.thetas), amps, self.adaptive)

    @torch.no_grad()
    def add_weight_grads(self, grad_scale: torch.Tensor | None = None) -> None:
        """W.grad += grad_scale * 2*A*hs(theta)*W for every trainable regularized W (deferred mode).

        ``grad_scale`` is the factor the loss was multiplied by before ``backward()`` (the fp16
        GradScaler's scale, a device tensor), so that unscaling treats both parts alike. Call it
        after ``backward()`` (and after DDP has averaged the gradients: the penalty's part is the
        same on every rank) and before the optimizer step, while the thetas are those of the
        forward pass. A constant number of launches, no host sync.
        """
        active = [i for i, w in enumerate(self._weights) if w.requires_grad]
        if not active:
            return
        weights = [self._weights[i] for i in active]
        for w in weights:
            if w.grad is None:  # a tensor the network did not use still gets its penalty gradient
                w.grad = torch.zeros_like(w)
        key = (tuple(active), tuple((w.device, w.dtype, w.shape, w.stride()) for w in weights))
        if self._spread is None or self._spread[0] != key:
            self._spread = (key, _SpreadCoefficients(weights, active))
        spread = self._spread[1]
        amps = self.amplitudes.to(spread.flat.dtype)
        coef = 2.0 * penalty_coefficients(list(self.thetas), amps, self.adaptive)
        if grad_scale is not None:
            coef = coef * grad_scale.to(coef.dtype)
        torch.index_select(coef, 0, spread.segment, out=spread.flat)
        torch._foreach_addcmul_([w.grad for w in weights], weights, spread.views)

    @torch.no_grad()
    def effective_factors(self) -> torch.Tensor:
        """A * hs(theta) per tensor ([n], on the device), or A for the constant-L2 ablation."""
        return penalty_coefficients(list(self.thetas), self.amplitudes.float(), self.adaptive).clone()

    def names(self) -> list[str]:
        return [e.name for e in self.entries]
