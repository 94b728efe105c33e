"""The three-branch re-ID network of docs/METHOD.md §2 on a torchvision ResNet (or the seed's Keras-style one).

Layout for a 384x128 input and ResNet-50 (NCHW):
    stem..layer3            -> [B, 1024, 24, 8]
    global:   layer4        -> [B, 2048, 24, 8]  (last stride 1)
    regional: copy(layer4)  -> [B, 2048, 24, 8], cut along H into ``region_num`` stripes,
              each stripe -> own 3x3 conv 2048->1024 (bias, zero padding per stripe) -> ReLU
    each branch: GAP -> clip to [clip_min, clip_max] -> f_b (triplet input, inference feature)
                 f_b -> BN neck (eps 2e-5) -> bias-free linear (N(0, 0.001^2)) -> logits
Inference feature: concat(f_global, f_stripe1, f_stripe2), 4096-d for ResNet-50.

``backbone_style="torchvision"`` (default, a declared deviation from the original code, docs/METHOD.md §11):
torchvision's ResNet (stride on the 3x3 conv, no conv biases, BN eps 1e-5) with torchvision
weights. ``backbone_style="keras"``: the seed's Caffe-style Keras ResNet
(``alr_fast.keras_resnet``: stride on the block's first 1x1 conv, conv biases, BN eps 1.001e-5),
which takes Keras .h5 weights (``alr_fast.keras_weights``): 265 / 469 / 673 regularized tensors
for ResNet-50 / 101 / 152, as the seed has.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .keras_resnet import KerasResNet, stage_layer_names
from .keras_weights import (
    KerasLoadInfo,
    KerasWeightsError,
    is_keras_file,
    keras_imagenet_file,
    load_keras_weights,
    read_keras_consumers,
    read_keras_h5,
)

_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be fetched or a weights file could not be used."""


def _imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    weights = getattr(torchvision.models, _WEIGHTS[backbone]).IMAGENET1K_V1
    url = weights.url
    filename = url.rsplit("/", 1)[-1]
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as exc:  # no network, proxy, truncated download ...
        raise PretrainedWeightsError(
            f"could not fetch the ImageNet weights of {backbone} ({exc.__class__.__name__}: {exc}).\n"
            f"Download {url} on a machine with internet access and place it at {hub_dir / filename}, "
            f"or pass model.pretrained=/path/to/{filename}, or model.pretrained=none for random init."
        ) from exc


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained='{path}': no such file (use none, imagenet, or the path of a "
            f"torchvision ResNet state dict)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"model.pretrained='{path}': cannot be read as a torch file: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"model.pretrained='{path}': expected a state dict, got {type(state).__name__}")
    return state


def build_backbone(name: str, pretrained: str = "none", style: str = "torchvision") -> nn.Module:
    """A ResNet without its classifier, with ``pretrained`` in none | imagenet | PATH.

    style torchvision: torchvision's ResNet and weights. style keras: ``KerasResNet`` with random
    init; its Keras .h5 weights (``imagenet`` or a .h5 PATH) are loaded by ``ReidNet`` once both
    conv5 copies exist; a non-.h5 PATH is a torch state dict of a ``KerasResNet``.
    """
    if style == "keras":
        net = KerasResNet(name)
        if pretrained in ("", "none", "imagenet") or is_keras_file(pretrained):
            return net
        state = _load_weights_file(pretrained)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise PretrainedWeightsError(f"model.pretrained='{pretrained}' does not fit a keras {name}: {exc}") from exc
        return net
    if style != "torchvision":
        raise ValueError(f"unknown backbone style '{style}'; choose torchvision or keras")
    if name not in _WEIGHTS:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(_WEIGHTS)}")
    net = getattr(torchvision.models, name)(weights=None)
    if pretrained == "imagenet":
        state = _imagenet_state_dict(name)
    elif pretrained not in ("", "none"):
        state = _load_weights_file(pretrained)
    else:
        state = None
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise PretrainedWeightsError(f"model.pretrained='{pretrained}' does not fit a torchvision {name}: {exc}") from exc
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise PretrainedWeightsError(
                f"model.pretrained='{pretrained}' does not fit a torchvision {name}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    net.fc = nn.Identity()
    return net


def _set_last_stride(layer4: nn.Sequential, stride: int) -> None:
    block = layer4[0]
    if hasattr(block, "set_stride"):  # Caffe style: the stride is on the first 1x1 conv
        block.set_stride(stride)
        return
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # torchvision: stride on the 3x3
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


class ReidNet(nn.Module):
    """Global branch + ``region_num`` stripe branches; returns features and logits per branch."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str = "none",
        region_num: int = 2,
        last_stride: int = 1,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        neck_eps: float = 2e-5,
        bn_momentum: float = 0.01,
        backbone_style: str = "torchvision",
    ) -> None:
        super().__init__()
        self.backbone_name, self.backbone_style = backbone, backbone_style
        net = build_backbone(backbone, pretrained, backbone_style)
        _set_last_stride(net.layer4, last_stride)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4
        self.region_num = region_num
        self.clip_min, self.clip_max = clip_min, clip_max
        channels = net.layer4[-1].conv3.out_channels if hasattr(net.layer4[-1], "conv3") else net.layer4[-1].conv2.out_channels
        # the seed's stripe conv: filters = channels // region_num (1024 of 2048 for its two stripes)
        stripe_channels = channels // max(region_num, 1)
        self.layer4_regional = copy.deepcopy(net.layer4) if region_num > 0 else None
        self.stripe_convs = nn.ModuleList(
            nn.Conv2d(channels, stripe_channels, 3, padding=1, bias=True) for _ in range(region_num)
        )
        dims = [channels] + [stripe_channels] * region_num
        self.necks = nn.ModuleList(nn.BatchNorm1d(d, eps=neck_eps, momentum=bn_momentum) for d in dims)
        self.classifiers = nn.ModuleList(nn.Linear(d, num_classes, bias=False) for d in dims)
        self.feature_dims = dims
        for conv in self.stripe_convs:
            nn.init.xavier_uniform_(conv.weight)  # Keras glorot_uniform
            nn.init.zeros_(conv.bias)
        for fc in self.classifiers:
            nn.init.normal_(fc.weight, std=0.001)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
        self._backbone_frozen = False
        self.keras_load_info: KerasLoadInfo | None = None
        if backbone_style == "keras" and (pretrained == "imagenet" or is_keras_file(pretrained)):
            self.keras_load_info = self._load_keras(pretrained)

    # -- Keras weights ----------------------------------------------------------------------
    def keras_layers(self) -> dict[str, list[tuple[str, nn.Module]]]:
        """Keras layer name -> [(module path, module)] of the backbone; conv5 layers list the global
        copy, then the regional one (keras style only)."""
        if self.backbone_style != "keras":
            raise ValueError("Keras layer names exist for backbone_style=keras only")
        out = {"conv1_conv": [("stem.0", self.stem[0])], "conv1_bn": [("stem.1", self.stem[1])]}
        for stage, attr in zip((2, 3, 4, 5), ("layer1", "layer2", "layer3", "layer4")):
            for name, entry in stage_layer_names(stage, getattr(self, attr), attr).items():
                out[name] = [entry]
        if self.layer4_regional is not None:
            for name, entry in stage_layer_names(5, self.layer4_regional, "layer4_regional").items():
                out[name].append(entry)
        return out

    def _load_keras(self, pretrained: str) -> KerasLoadInfo:
        path = keras_imagenet_file(self.backbone_name, Path(torch.hub.get_dir()) / "checkpoints") if pretrained == "imagenet" else pretrained
        try:
            info = load_keras_weights(self, read_keras_h5(path), f"model.pretrained='{path}'", read_keras_consumers(path))
        except KerasWeightsError as exc:
            raise PretrainedWeightsError(str(exc)) from exc
        log = logging.getLogger("alr_fast")
        log.info("%s (%s): %d tensors, %d thetas", path, info.kind, info.tensors, len(info.thetas))
        for note in info.notes:
            log.info("note: %s", note)
        return info

    # -- freezing (phase A) ---------------------------------------------------------------
    def backbone_modules(self) -> list[nn.Module]:
        mods = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        return mods + ([self.layer4_regional] if self.layer4_regional is not None else [])

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Phase A: the ResNet sub-models take no gradient and their BNs run in inference mode."""
        self._backbone_frozen = frozen
        for mod in self.backbone_modules():
            mod.requires_grad_(not frozen)
        self.train(self.training)

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def train(self, mode: bool = True) -> "ReidNet":
        super().train(mode)
        if self._backbone_frozen:
            for mod in self.backbone_modules():
                mod.eval()
        return self

    # -- forward ----------------------------------------------------------------------------
    def _clip_gap(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1).float().clamp(self.clip_min, self.clip_max)

    def branch_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Clipped pre-BN GAP features, one [B, C_b] float32 tensor per branch."""
        x = self.layer3(self.layer2(self.layer1(self.stem(images))))
        feats = [self._clip_gap(self.layer4(x))]
        if self.region_num:
            r = self.layer4_regional(x)
            height = r.shape[2]
            step = height // self.region_num
            for i, conv in enumerate(self.stripe_convs):
                stop = height if i == self.region_num - 1 else (i + 1) * step
                feats.append(self._clip_gap(F.relu(conv(r[:, :, i * step : stop]))))
        return feats

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images [B,3,H,W] -> (features per branch [B,C_b], logits per branch [B,num_classes])."""
        feats = self.branch_features(images)
        logits = [fc(neck(f.to(neck.weight.dtype))) for f, neck, fc in zip(feats, self.necks, self.classifiers)]
        return feats, logits

    @torch.no_grad()
    def embed(self, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
        """Inference feature [B, sum(C_b)] (4096-d for ResNet-50), averaged with the flipped image's."""
        out = torch.cat(self.branch_features(images), dim=1)
        if flip:
            out = (out + torch.cat(self.branch_features(images.flip(3)), dim=1)) / 2
        return out


def build_model(cfg, num_classes: int) -> ReidNet:
    """Build the network of ``cfg.model`` (a ModelConfig) for ``num_classes`` training identities."""
    return ReidNet(
        num_classes,
        backbone=cfg.backbone,
        pretrained=cfg.pretrained,
        region_num=cfg.region_num,
        last_stride=cfg.last_stride,
        clip_min=cfg.clip_min,
        clip_max=cfg.clip_max,
        neck_eps=cfg.neck_eps,
        bn_momentum=cfg.bn_momentum,
        backbone_style=cfg.backbone_style,
    )
