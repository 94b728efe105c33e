"""The configuration tree: frozen dataclasses, loaded from YAML, with ``key=value`` overrides.

The dataclass defaults are the seed's defaults (docs/METHOD.md §1); a YAML recipe only states what differs
or restates them for the reader. Only the CLI and the ``build_*`` functions read a ``Config``;
library functions take explicit arguments.

Errors name the offending key: an unknown key (with the closest known ones), a wrong type, or a
value outside its allowed set, all raised as ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("market1501", "dukemtmc_reid", "msmt17")
BACKBONES = ("resnet50", "resnet101", "resnet152", "resnet18", "resnet34")
BACKBONE_STYLES = ("torchvision", "keras")
KERAS_BACKBONES = ("resnet50", "resnet101", "resnet152")  # Keras has no Caffe-style ResNet-18/34
LR_MODES = ("default", "constant", "linear", "cosine", "warmup")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOADERS = ("auto", "torch", "dali", "cache")
METRICS = ("cosine", "euclidean", "sqeuclidean")
COMPILE_MODES = ("auto", "none", "cudagraphs", "default", "reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the key."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads Python's float spellings (``2e-4``, ``1e9``, ``2e-05``).

    PyYAML implements YAML 1.1, whose float pattern needs a dot, so ``2e-4`` would load as a
    string; YAML 1.2 and Python read it as a number. Used for files and overrides alike.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str, source: str):
    """Parse YAML ``text`` with the project's loader; errors name ``source``."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: builds plain data only
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None


def read_yaml_file(path, source: str | None = None):
    """Read and parse a YAML file; a file that is not UTF-8 text is a ConfigError naming it."""
    source = source or f"config file '{path}'"
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source} is not UTF-8 text (line {line} has the byte 0x{raw[exc.start]:02x})") from None
    return read_yaml(text, source)


@dataclass(frozen=True)
class DataConfig:
    """Dataset, input size, sampler and augmentation (docs/METHOD.md §5, §6, §9)."""

    dataset: str = "market1501"  # market1501 | dukemtmc_reid | msmt17
    root: str = "data"  # folder that holds Market-1501-v15.09.15/, DukeMTMC-reID/ or MSMT17_V2/
    height: int = 384
    width: int = 128
    identities_per_batch: int = 16  # P
    images_per_identity: int = 4  # K
    steps_per_epoch: int = 200
    identity_balancing: bool = False
    augmentation: bool = True  # flip, pad and random crop
    random_erasing: bool = True  # RandomErasingImageAugmentor; false gives BaseImageAugmentor
    padding: int = 10
    # auto: on a GPU the decode-once cache when it fits gpu_cache_budget_gb, else DALI; on a CPU torch.
    # torch: CPU reference pipeline in a DataLoader; dali: DALI (CPU operators without a GPU);
    # cache: decode once into device memory, augment per step with torch ops
    loader: str = "auto"
    gpu_cache_budget_gb: float = 6.0  # MSMT17 at 384x128 takes 4.8 GB
    dali_threads: int = 4
    dali_prefetch: int = 2
    dali_source_workers: int = 0  # > 0: DALI's parallel external source with that many processes
    num_workers: int = 2
    skip_corrupt: bool = False  # true: drop unreadable JPEGs with a warning instead of stopping
    verify_images: bool = True  # decode every image once at load time to find corrupt files early
    testing_size: float = 1.0  # 1: full test set, 0: none, (0,1): fraction of ids, >1: number of ids
    validation_size: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """The three-branch ResNet (docs/METHOD.md §2) on a torchvision or the seed's Keras-style backbone."""

    backbone: str = "resnet50"
    # torchvision: torchvision's ResNet and normalisation; keras: the seed's Caffe-style Keras ResNet,
    # BGR minus the ImageNet means, Keras .h5 weights
    backbone_style: str = "torchvision"
    pretrained: str = "imagenet"  # none | imagenet | PATH: torchvision state dict, alr-fast checkpoint, Keras .h5
    region_num: int = 2
    last_stride: int = 1
    clip_min: float = 0.0
    clip_max: float = 1.0
    neck_eps: float = 2e-5
    bn_momentum: float = 0.01  # Keras momentum 0.99 in PyTorch's convention


@dataclass(frozen=True)
class RegularizerConfig:
    """Adaptive L2 (docs/METHOD.md §3); a negative factor leaves that kind of tensor unregularized."""

    adaptive: bool = True  # false: constant L2, A * sum(W^2)
    kernel_factor: float = 0.005
    bias_factor: float = 0.005
    gamma_factor: float = 0.005
    beta_factor: float = 0.005
    implementation: str = "fused"  # fused (multi-tensor norm and gradient ops) | reference


@dataclass(frozen=True)
class OptimConfig:
    """Adam, the two phases and the learning-rate schedule (docs/METHOD.md §7)."""

    freeze_backbone_epochs: int = 20  # phase A
    epochs: int = 200  # phase B
    lr_mode: str = "default"
    lr_start: float = 2e-4
    lr_end: float = 2e-4
    lr_base: float = 2e-4
    lr_warmup_epochs: int = 10
    lr_steady_epochs: int = 30
    lr_drop_factor: float = 10.0
    lr_lower_bound: float = 2e-6
    adam_eps: float = 1e-7
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    tf_adam_step: bool = False  # true: newly unfrozen parameters start at the global Adam step, as TF does
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (docs/METHOD.md §8)."""

    every_epochs: int = 10  # evaluate_testing_every_N_epochs, counted within each phase
    validation_every_epochs: int = 1
    flip: bool = True
    metric: str = "cosine"
    re_ranking: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    batch_size: int = 0  # images per extraction batch; 0: auto (64 on a CPU, by free memory on a GPU)
    max_rank: int = 50
    memory_budget_gb: float = 2.0  # scratch memory of the GPU evaluation kernels beyond inputs and outputs
    save_features: bool = False
    precision: str = "fp32"  # extraction arithmetic: fp32 as the seed | bf16 | fp16 (autocast, opt-in)
    exact: bool = False  # true: float64 reference distances and sorted ranking (CPU runs otherwise use float32 BLAS)
    rerank_gemm: str = "float32"  # GEMM of the q-q and g-g matrices that only feed re-ranking: float32 | tf32 | bf16
    cache: str = "auto"  # decode-once cache of the query/gallery images: auto | device | host | none (JPEG loader)
    cache_budget_gb: float = 16.0  # auto keeps the evaluation cache in device memory while it fits this
    capture: bool = True  # on a GPU: the embedding forward captured in a CUDA graph (false: eager)


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    out_dir: str = ""  # empty: runs/<dataset>_<H>x<W>/<backbone>_<P>_<K>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on a CPU
    channels_last: bool = True  # on a GPU
    log_every: int = 20  # steps between loss reads (the only host syncs of the loop)
    checkpoint_every: int = 1  # epochs
    progress: bool = True
    plots: bool = True
    # auto: reduce-overhead (Inductor + CUDA graphs) on a GPU, none on a CPU | none | cudagraphs (CUDA graphs of
    # the eager kernels, compiles in seconds) | default | max-autotune
    compile: str = "auto"
    profile_steps: int = 0  # > 0: torch.profiler trace of that many steps in the first epoch
    nvtx: bool = False  # named ranges (data, forward, backward, regularizer, optimizer, evaluation)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def default_out_dir(self) -> str:
        d = self.data
        return f"runs/{d.dataset}_{d.height}x{d.width}/{self.model.backbone}_{d.identities_per_batch}_{d.images_per_identity}"


# Allowed values of string fields; checked after every load.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": DATASETS,
    "data.loader": LOADERS,
    "model.backbone": BACKBONES,
    "model.backbone_style": BACKBONE_STYLES,
    "optim.lr_mode": LR_MODES,
    "run.precision": PRECISIONS,
    "eval.metric": METRICS,
    "regularizer.implementation": ("fused", "reference"),
    "run.compile": COMPILE_MODES,
    "eval.precision": ("fp32", "bf16", "fp16"),
    "eval.rerank_gemm": ("float32", "tf32", "bf16"),
    "eval.cache": ("auto", "device", "host", "none"),
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless; raise ConfigError otherwise."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp in (int, float, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(
        f"config key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}"
    )


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (known here: {', '.join(known)})")


def config_from_dict(
    data: dict[str, Any], base: Config | None = None, source: str = "config", validate: bool = True
) -> Config:
    """Merge a nested ``{section: {key: value}}`` dict into ``base`` (defaults when None).

    ``validate=False`` leaves the range and cross-key checks to the caller (``load_config`` runs
    them once, after the file and the overrides, so an override may repair what a file set)."""
    cfg = base or Config()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    sections = _field_types(Config)
    updates = {}
    for section, values in data.items():
        if section not in sections:
            raise _unknown_key(str(section), list(sections))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        sub_cls = sections[section]
        types_ = _field_types(sub_cls)
        current = getattr(cfg, section)
        changes = {}
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in types_:
                raise _unknown_key(full, list(types_))
            changes[key] = _check_type(full, value, types_[key])
        updates[section] = dataclasses.replace(current, **changes)
    cfg = dataclasses.replace(cfg, **updates)
    if validate:
        validate_config(cfg)
    return cfg


def _check_split_count(key: str, value: float) -> None:
    if value > 1 and value != int(value):
        raise ConfigError(
            f"config key '{key}' above 1 is a number of {'identities' if 'testing' in key else 'images'} "
            f"and must be a whole number; got {value}"
        )


def validate_config(cfg: Config) -> None:
    """Check allowed values, ranges and rules between keys; raise ConfigError naming the key.

    Everything decidable from the config alone is checked here, before any data is read; rules
    that need the dataset or the model's shapes live in ``alr_fast.preflight``.
    """
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    # NaN passes every comparison below, and no key means anything by an infinite value
    for section, values in config_to_dict(cfg).items():
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{section}.{name}' must be a finite number; got {value}")
    positive = {
        "data.height": cfg.data.height,
        "data.width": cfg.data.width,
        "data.identities_per_batch": cfg.data.identities_per_batch,
        "data.images_per_identity": cfg.data.images_per_identity,
        "data.steps_per_epoch": cfg.data.steps_per_epoch,
        "eval.every_epochs": cfg.eval.every_epochs,
        "eval.validation_every_epochs": cfg.eval.validation_every_epochs,
        "eval.max_rank": cfg.eval.max_rank,
        "eval.k1": cfg.eval.k1,
        "eval.k2": cfg.eval.k2,
        "run.log_every": cfg.run.log_every,
        "data.dali_threads": cfg.data.dali_threads,
        "data.dali_prefetch": cfg.data.dali_prefetch,
        "run.checkpoint_every": cfg.run.checkpoint_every,
        "optim.lr_warmup_epochs": cfg.optim.lr_warmup_epochs,
        "optim.lr_steady_epochs": cfg.optim.lr_steady_epochs,
        "optim.adam_eps": cfg.optim.adam_eps,
        "model.neck_eps": cfg.model.neck_eps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive; got {value}")
    for key, value in {
        "optim.freeze_backbone_epochs": cfg.optim.freeze_backbone_epochs,
        "optim.epochs": cfg.optim.epochs,
        "data.num_workers": cfg.data.num_workers,
        "data.dali_source_workers": cfg.data.dali_source_workers,
        "data.gpu_cache_budget_gb": cfg.data.gpu_cache_budget_gb,
        "eval.memory_budget_gb": cfg.eval.memory_budget_gb,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.cache_budget_gb": cfg.eval.cache_budget_gb,
        "data.padding": cfg.data.padding,
        "model.region_num": cfg.model.region_num,
        "data.testing_size": cfg.data.testing_size,
        "data.validation_size": cfg.data.validation_size,
        "run.profile_steps": cfg.run.profile_steps,
        "optim.lr_start": cfg.optim.lr_start,
        "optim.lr_end": cfg.optim.lr_end,
        "optim.lr_base": cfg.optim.lr_base,
        "optim.lr_lower_bound": cfg.optim.lr_lower_bound,
        "optim.lr_drop_factor": cfg.optim.lr_drop_factor,
    }.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0; got {value}")
    if cfg.model.backbone_style == "keras" and cfg.model.backbone not in KERAS_BACKBONES:
        raise ConfigError(
            f"config key 'model.backbone' must be one of {', '.join(KERAS_BACKBONES)} with model.backbone_style=keras; "
            f"got {cfg.model.backbone!r}"
        )
    for key, value in {
        "optim.adam_beta1": cfg.optim.adam_beta1,
        "optim.adam_beta2": cfg.optim.adam_beta2,
        "optim.label_smoothing": cfg.optim.label_smoothing,
    }.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key '{key}' must lie in [0, 1); got {value}")
    if not 0.0 <= cfg.model.bn_momentum <= 1.0:
        raise ConfigError(f"config key 'model.bn_momentum' must lie in [0, 1]; got {cfg.model.bn_momentum}")
    if cfg.model.last_stride not in (1, 2):
        raise ConfigError(f"config key 'model.last_stride' must be 1 or 2; got {cfg.model.last_stride}")
    if cfg.eval.exact and cfg.eval.rerank_gemm != "float32":
        raise ConfigError(f"config key 'eval.rerank_gemm={cfg.eval.rerank_gemm}' contradicts eval.exact=true "
                          f"(the exact path computes every matrix in float64); use eval.rerank_gemm=float32")
    if not 0.0 <= cfg.eval.lambda_value <= 1.0:
        raise ConfigError(f"config key 'eval.lambda_value' must lie in [0, 1]; got {cfg.eval.lambda_value}")
    if cfg.model.clip_min >= cfg.model.clip_max:
        raise ConfigError(
            f"config key 'model.clip_min' ({cfg.model.clip_min}) must be below 'model.clip_max' "
            f"({cfg.model.clip_max}): every feature would be the same constant"
        )
    _check_split_count("data.testing_size", cfg.data.testing_size)
    _check_split_count("data.validation_size", cfg.data.validation_size)
    if cfg.data.images_per_identity < 2:
        raise ConfigError(
            f"config key 'data.images_per_identity' must be >= 2; got {cfg.data.images_per_identity}: "
            f"with one image per identity no anchor of the triplet loss has a positive"
        )
    if cfg.optim.freeze_backbone_epochs + cfg.optim.epochs == 0:
        raise ConfigError(
            "config keys 'optim.freeze_backbone_epochs' and 'optim.epochs' are both 0: there is nothing to train"
        )
    _check_schedule(cfg.optim)


def _check_schedule(o: OptimConfig) -> None:
    """The learning-rate modes' own preconditions (docs/METHOD.md §7.2), found now instead of at an epoch start."""
    if o.lr_mode == "constant" and o.lr_start != o.lr_end:
        raise ConfigError(f"optim.lr_mode=constant needs optim.lr_start == optim.lr_end; got {o.lr_start} and {o.lr_end}")
    if o.lr_mode == "cosine" and not o.lr_start > o.lr_end:
        raise ConfigError(f"optim.lr_mode=cosine needs optim.lr_start > optim.lr_end; got {o.lr_start} and {o.lr_end}")
    if o.lr_mode == "default" and o.lr_drop_factor == 0:
        if o.epochs == 2 * o.lr_warmup_epochs:
            raise ConfigError(
                "optim.lr_drop_factor=0 derives the factor from optim.epochs - 2 * optim.lr_warmup_epochs, which is 0"
            )
        if o.lr_base <= 0 or o.lr_lower_bound <= 0:
            raise ConfigError("optim.lr_drop_factor=0 derives the factor from log(lr_base / lr_lower_bound): both must be > 0")


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.epochs=5"`` -> ``("optim.epochs", 5)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key '{key}' must be section.key (e.g. optim.epochs=5)")
    value = read_yaml(raw, f"override '{text}': the value") if raw.strip() else ""
    if value is None:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: list[str], validate: bool = True) -> Config:
    nested: dict[str, dict[str, Any]] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".")
        # str fields take the raw text, so that e.g. run.out_dir=2024 stays a path
        types_ = _field_types(Config)
        if section in types_ and _field_types(types_[section]).get(name) is str and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()
        nested.setdefault(section, {})[name] = value
    return config_from_dict(nested, cfg, source="command line", validate=validate)


def bundled_config_names() -> list[str]:
    files = resources.files("alr_fast.configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path | Any:
    """A path to a YAML file, or the name of a bundled recipe (``market1501_resnet50``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    bundled = resources.files("alr_fast.configs") / f"{stem}.yaml"
    if str(path) == path.name and bundled.is_file():
        return bundled
    raise ConfigError(
        f"config file '{name_or_path}' does not exist; bundled recipes: {', '.join(bundled_config_names())}"
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file or bundled recipe, then the overrides; validated once at the end."""
    cfg = Config()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        cfg = config_from_dict(read_yaml_file(path, f"config file '{name_or_path}'"), cfg, source=str(name_or_path),
                               validate=False)
    if overrides:
        cfg = apply_overrides(cfg, overrides, validate=False)
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


KEY_HELP = {
    "data.dataset": "market1501 | dukemtmc_reid | msmt17",
    "data.root": "folder holding Market-1501-v15.09.15/, DukeMTMC-reID/ or MSMT17_V2/",
    "data.height": "input height (cv2-style bilinear resize)",
    "data.width": "input width",
    "data.identities_per_batch": "P of the P x K sampler (per process)",
    "data.images_per_identity": "K of the P x K sampler",
    "data.steps_per_epoch": "batches per epoch, whatever the dataset size",
    "data.identity_balancing": "each identity gives at most one K-chunk per sampler pass",
    "data.augmentation": "flip, pad and random crop in training",
    "data.random_erasing": "random erasing (p 0.5, 100 attempts, fill 125,122,113)",
    "data.padding": "zero padding on each side before the random crop",
    "data.loader": "auto | torch | dali | cache (see README: Data loaders)",
    "data.gpu_cache_budget_gb": "auto picks the decode-once device cache when it fits this",
    "data.dali_threads": "DALI CPU threads",
    "data.dali_prefetch": "DALI prefetch queue depth",
    "data.dali_source_workers": "> 0: DALI parallel external source processes",
    "data.num_workers": "DataLoader workers (torch loader) / decoding threads (cache)",
    "data.skip_corrupt": "drop unreadable JPEGs with a warning instead of stopping",
    "data.verify_images": "decode every image once at load time to find corrupt files",
    "data.testing_size": "1 full test set, 0 none, (0,1) fraction of test ids, >1 number of ids",
    "data.validation_size": "0 none; fraction or count of training images held out for validation",
    "model.backbone": "resnet50 | resnet101 | resnet152 (resnet18/34 for CPU demos)",
    "model.backbone_style": "torchvision | keras (the seed's Caffe-style ResNet, BGR mean-subtracted input, .h5 weights)",
    "model.pretrained": "none | imagenet | PATH (torchvision state dict, alr-fast checkpoint; keras: notop or training_model .h5)",
    "model.region_num": "horizontal stripes of the regional branch (0 disables it)",
    "model.last_stride": "stride of layer4 (1: the last-stride-1 trick)",
    "model.clip_min": "lower clip of every GAP feature",
    "model.clip_max": "upper clip of every GAP feature",
    "model.neck_eps": "epsilon of the BN necks",
    "model.bn_momentum": "BN momentum in PyTorch's convention (Keras 0.99 -> 0.01)",
    "regularizer.adaptive": "true: A*hs(theta)*sum(W^2); false: constant L2 A*sum(W^2)",
    "regularizer.kernel_factor": "A for conv/linear kernels (negative: not regularized)",
    "regularizer.bias_factor": "A for conv biases",
    "regularizer.gamma_factor": "A for BN gamma",
    "regularizer.beta_factor": "A for BN beta",
    "regularizer.implementation": "fused (one multi-tensor norm) | reference (per-tensor loop)",
    "optim.freeze_backbone_epochs": "phase A: epochs with the ResNet frozen (BN in eval mode)",
    "optim.epochs": "phase B epochs",
    "optim.lr_mode": "default | constant | linear | cosine | warmup",
    "optim.lr_start": "start LR of constant/linear/cosine/warmup",
    "optim.lr_end": "end LR of constant/linear/cosine/warmup",
    "optim.lr_base": "peak LR of the default mode",
    "optim.lr_warmup_epochs": "linear warm-up epochs (restarts each phase)",
    "optim.lr_steady_epochs": "epochs per step of the step decay",
    "optim.lr_drop_factor": "step-decay divisor (0: derived)",
    "optim.lr_lower_bound": "warm-up start and floor of every mode",
    "optim.adam_eps": "Adam epsilon (Keras default 1e-7)",
    "optim.adam_beta1": "Adam beta1",
    "optim.adam_beta2": "Adam beta2",
    "optim.tf_adam_step": "parameters unfrozen in phase B start at the global Adam step (TF)",
    "optim.label_smoothing": "label smoothing of the identity loss",
    "eval.every_epochs": "test evaluation every N epochs within each phase (plus a report-only one at the end)",
    "eval.validation_every_epochs": "validation evaluation every N epochs",
    "eval.flip": "average features with the horizontally flipped image's",
    "eval.metric": "cosine | euclidean | sqeuclidean",
    "eval.re_ranking": "also report k-reciprocal re-ranked metrics",
    "eval.k1": "re-ranking k1",
    "eval.k2": "re-ranking k2 (query expansion)",
    "eval.lambda_value": "re-ranking weight of the original distance",
    "eval.batch_size": "feature-extraction batch size; 0: auto (64 on a CPU, by free memory on a GPU)",
    "eval.max_rank": "length of the CMC curve",
    "eval.memory_budget_gb": "scratch memory of the GPU evaluation kernels",
    "eval.save_features": "alr-fast evaluate also writes the features (.npz)",
    "eval.precision": "feature extraction in fp32 (the seed) | bf16 | fp16 (autocast, faster on a GPU)",
    "eval.exact": "true: float64 reference distances and sorted ranking; false: float32 BLAS on a CPU",
    "eval.rerank_gemm": "GEMM of the re-ranking-only q-q/g-g matrices: float32 | tf32 | bf16 (tensor cores)",
    "eval.cache": "query/gallery decoded once per run: auto | device | host (pinned on a GPU) | none",
    "eval.cache_budget_gb": "auto keeps the evaluation cache in device memory while it fits this",
    "eval.capture": "on a GPU, capture the embedding forward in a CUDA graph (false: eager)",
    "run.out_dir": "run directory (never overwritten); empty: runs/<dataset>_<H>x<W>/<backbone>_<P>_<K>",
    "run.seed": "seed of model init, sampler and augmentation (per rank)",
    "run.device": "auto | cpu | cuda | cuda:N",
    "run.precision": "auto (bf16 on a GPU, fp32 on a CPU) | bf16 | fp16 | fp32",
    "run.channels_last": "channels_last memory format on a GPU",
    "run.log_every": "steps between loss reads (the loop's only host syncs)",
    "run.checkpoint_every": "epochs between checkpoints",
    "run.progress": "progress bars",
    "run.plots": "write plots into RUN/plots",
    "run.compile": "auto (reduce-overhead, i.e. the step captured in CUDA graphs, on a GPU; none on a CPU) | none "
                   "(eager, capture off) | cudagraphs (CUDA graphs of the eager kernels: compiles in seconds, no "
                   "Inductor fusion) | default | reduce-overhead | max-autotune",
    "run.profile_steps": "> 0: torch.profiler trace of that many steps",
    "run.nvtx": "NVTX ranges around data, forward, backward, regularizer, optimizer, evaluation",
}


def format_value(value: Any) -> str:
    """A config value spelled as a user types it in YAML or an override: ``true``, ``2e-5``, ``""``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}e{int(exponent)}" if e else text  # 2e-05 -> 2e-5
    if isinstance(value, str):
        # quote only what YAML would read as something else (empty, a number, a bool, null)
        return value if value and isinstance(read_yaml(value, "value"), str) else f'"{value}"'
    return str(value)


def describe_keys() -> str:
    """One line per key with its default and what it does, for ``--help``."""
    lines = []
    defaults = config_to_dict(Config())
    for section, values in defaults.items():
        for key, value in values.items():
            name = f"{section}.{key}={format_value(value)}"
            lines.append(f"  {name:<40} {KEY_HELP.get(f'{section}.{key}', '')}".rstrip())
    return "\n".join(lines)


__all__ = [
    "Config", "DataConfig", "ModelConfig", "RegularizerConfig", "OptimConfig", "EvalConfig",
    "RunConfig", "ConfigError", "load_config", "apply_overrides", "config_from_dict", "dump_config",
    "config_to_dict", "bundled_config_names", "describe_keys",
]
