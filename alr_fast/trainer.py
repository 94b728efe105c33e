"""The training loop: ``Trainer.train_step(batch) -> dict of losses`` and a short ``fit``.

Host-device synchronisation happens only where it is deliberate: reading the accumulated losses
every ``run.log_every`` steps, the per-epoch factor log, evaluation and checkpointing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import preflight
from .config import (
    Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, dump_config, parse_override, read_yaml_file,
)
from .data import build_data
from .evaluation import FeatureExtractor, evaluate_features, format_metrics
from .guards import (
    EXIT_DISK_FULL, SIGNAL_EXIT, DivergenceError, RunStopped, StopSignals, Terminated, divergence_advice,
    nonfinite_tensors,
)
from .runs import (
    BEST, CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, FACTOR_NAMES, LOCK, LOGS, CheckpointError, JsonlLog, RunDirError,
    RunLock, atomic_write_bytes, check_new_run_dir, check_resume_dir, is_disk_full, is_run_dir, load_checkpoint,
    peek_checkpoint, read_checkpoint_config, remove_temporaries, resolve_checkpoint, save_checkpoint, setup_logging, strict_record,
)
from .schedule import learning_rate, schedule_from_config
from .distributed import DistEnv, all_reduce_mean, barrier, gather_numpy, gather_objects, gather_rows, init_distributed, shutdown
from .evaluation import FeatureSet
from .profiling import Regions, step_profiler
from .task import ReidTask, build_task, state_differences

log = logging.getLogger("alr_fast")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# keys that may change when a run is resumed: they do not alter the schedule or the results
RESUMABLE_OVERRIDES = {
    "data.root", "data.num_workers", "data.verify_images", "run.device", "run.progress", "run.log_every", "run.plots",
    "run.compile",
}
# torch.compile modes that capture the step in CUDA graphs (cudagraph trees) on a GPU:
# "cudagraphs" records the eager ATen kernels (no Inductor codegen: it compiles in seconds),
# "reduce-overhead" / "max-autotune" capture Inductor's fused kernels (minutes of compilation)
CUDA_GRAPH_MODES = ("cudagraphs", "reduce-overhead", "max-autotune")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but no CUDA GPU is visible; use run.device=cpu or auto")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def resolve_compile(name: str, device: torch.device) -> str:
    """``run.compile``: auto captures the step in CUDA graphs on a GPU and stays eager on a CPU."""
    if name == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return name


def configure_cuda_math(precision: str) -> None:
    """cuDNN autotuning for the fixed training shapes, and fp32 that really is fp32 (no TF32 in
    matmuls or convolutions, as the seed computes). Mixed precision keeps torch's defaults for the
    few float32 ops outside autocast. Process-wide settings, as cuDNN and cuBLAS have them."""
    torch.backends.cudnn.benchmark = True
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def compile_module(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``run.compile`` -> the wrapped module: cudagraphs is torch.compile's CUDA-graph backend over
    AOT-autograd graphs of eager kernels; default / reduce-overhead / max-autotune go through Inductor."""
    if mode == "none":
        return module
    if mode == "cudagraphs":
        return torch.compile(module, backend="cudagraphs")
    return torch.compile(module, mode=None if mode == "default" else mode)


def input_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype loaders hand images over in: the autocast dtype on a GPU (half the bytes of
    float32, and no cast before the first convolution), float32 on a CPU."""
    return AUTOCAST_DTYPES.get(precision, torch.float32) if device.type == "cuda" else torch.float32


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class Trainer:
    """One optimisation step of a ReidTask; precision is an argument, not a subclass.

    ``step_module`` is what the step calls: the task itself, wrapped in DistributedDataParallel
    when several processes train, and compiled (``compile_mode``; "reduce-overhead" captures the
    forward and backward in CUDA graphs) when asked. DDP is rebuilt when the set of trainable
    parameters changes (phase A -> B), since its gradient buckets are fixed at construction.

    Nothing in ``train_step`` waits for the device (tests/test_step_syncs.py): on a GPU the
    optimizer is fused Adam, which takes the fp16 GradScaler's scale and inf flag as device
    tensors, and the fused penalty's weight gradients are one multi-tensor op.
    """

    def __init__(
        self,
        task: ReidTask,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        precision: str = "fp32",
        dist_env: DistEnv | None = None,
        compile_mode: str = "none",
        regions: Regions | None = None,
    ) -> None:
        if precision not in ("fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"precision must be fp32, bf16 or fp16; got {precision!r}")
        self.task, self.optimizer, self.device, self.precision = task, optimizer, device, precision
        self.dist = dist_env or DistEnv()
        self.compile_mode = resolve_compile(compile_mode, device)
        self.regions = regions or Regions(False)
        task.regions = self.regions
        if device.type == "cuda":
            configure_cuda_math(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._one = torch.ones((), device=device)
        reg = task.regularizer
        if reg is not None:  # fused: weight gradients of the penalty in one multi-tensor op after backward
            reg.defer_weight_grads = reg.implementation == "fused"
        self.step_module: torch.nn.Module = task
        self._wrap()

    def _wrap(self) -> None:
        module: torch.nn.Module = self.task
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # gradients are views into the all-reduce buckets: no copy in or out of them per step
            module = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)
        self.step_module = compile_module(module, self.compile_mode)

    def set_backbone_frozen(self, frozen: bool) -> None:
        changed = self.task.model.backbone_frozen != frozen
        self.task.set_backbone_frozen(frozen)
        if changed and (self.dist.enabled or self.compile_mode != "none"):
            self._wrap()

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """batch = (images [B,3,H,W], labels [B], camids [B]) -> detached losses on the device
        (0-d views of one fresh tensor, which later steps do not overwrite)."""
        images, labels, _ = batch
        # free the last step's gradients before the forward: they would add a copy of the
        # parameters to the activation peak
        self.optimizer.zero_grad(set_to_none=True)
        if self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # a new generation: the graphs may reuse last step's outputs
        with self.regions("forward"), self.autocast():
            losses = self.step_module(images, labels)
        with self.regions("backward"):
            self.scaler.scale(losses["total"]).backward()
        reg = self.task.regularizer
        if reg is not None and reg.defer_weight_grads and len(reg):
            with self.regions("regularizer"):
                # the loss was scaled (fp16) before backward: scale the penalty's part alike
                reg.add_weight_grads(self.scaler.scale(self._one) if self.scaler.is_enabled() else None)
        with self.regions("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # one copy out of the CUDA-graph pool, whose memory the next replay reuses
        values = torch.stack([v.detach().float() for v in losses.values()])
        return dict(zip(losses, values.unbind()))


def build_optimizer(task: torch.nn.Module, optim, device: torch.device) -> torch.optim.Adam:
    """Keras-default Adam (eps 1e-7) over every parameter, thetas included, in one group."""
    kwargs = dict(lr=optim.lr_base, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps, weight_decay=0.0)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.Adam(task.parameters(), **kwargs)


def start_at_global_step(optimizer: torch.optim.Optimizer, params, step: int) -> int:
    """TF applies Adam's bias correction with the global step: give parameters that have no
    optimizer state yet the state of a parameter first seen at ``step`` (docs/METHOD.md §7.3)."""
    count = 0
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if p in params and not optimizer.state.get(p):
                dev = p.device if on_device else "cpu"
                optimizer.state[p] = {
                    "step": torch.tensor(float(step), dtype=torch.float32, device=dev),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
                count += 1
    return count


@dataclass(frozen=True)
class EpochPlan:
    index: int  # global epoch index over both phases, 0-based
    phase: str  # "A" (backbone frozen) or "B"
    epoch: int  # index within the phase; the LR schedule and the evaluation cadence restart per phase
    last_of_phase: bool


def plan_epochs(freeze_epochs: int, epochs: int) -> list[EpochPlan]:
    plan = [EpochPlan(i, "A", i, i == freeze_epochs - 1) for i in range(freeze_epochs)]
    plan += [EpochPlan(freeze_epochs + i, "B", i, i == epochs - 1) for i in range(epochs)]
    return plan


def versions() -> dict[str, str]:
    # plain str: torch.__version__ is a str subclass, which weights_only loading would refuse
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def evaluate_splits(
    task: ReidTask, loaders: dict, cfg: Config, progress: bool = False, splits=None,
    dist_env: DistEnv | None = None, *, keep_features: bool = False, stage_times: dict | None = None,
) -> dict:
    """Evaluate the model on each (query, gallery) pair of ``loaders``.

    Extraction runs at ``eval.precision`` (not at the training step's autocast), captured in a
    CUDA graph on a GPU (``eval.capture``), one graph for the query and the gallery of a split.
    Each rank extracts features of its contiguous shard; the shards are gathered in rank order.
    On a GPU, torch's cached blocks are released before the CuPy kernels run (CuPy cannot use
    them). Returns {split: (metrics, (query, gallery) FeatureSets if ``keep_features`` else None)}:
    the feature sets are not kept alive through the next training epochs unless asked for.
    ``stage_times`` receives seconds per stage ("extraction", "distance", ...; see
    ``evaluate_features``), device-synchronised: for benchmarks.
    """
    env = dist_env or DistEnv()
    out = {}
    for split, (qloader, gloader) in loaders.items():
        if splits is not None and split not in splits:
            continue
        extractor = FeatureExtractor(task.model, flip=cfg.eval.flip, precision=cfg.eval.precision,
                                     capture=None if cfg.eval.capture else False)
        sets = []
        start = time.perf_counter()
        for loader, part in ((qloader, "query"), (gloader, "gallery")):
            fs = extractor(loader, progress=progress, desc=f"{split} {part}")
            if env.enabled:
                fs = FeatureSet(gather_rows(fs.features, env), gather_numpy(fs.pids, env, fs.features.device),
                                gather_numpy(fs.camids, env, fs.features.device))
            sets.append(fs)
        del extractor  # frees the CUDA graph's memory pool before the kernels allocate theirs
        q, g = sets
        if q.features.is_cuda:
            if stage_times is not None:
                torch.cuda.synchronize(q.features.device)
            torch.cuda.empty_cache()
        if stage_times is not None:
            stage_times["extraction"] = stage_times.get("extraction", 0.0) + time.perf_counter() - start
        metrics = evaluate_features(
            q, g, metric=cfg.eval.metric, re_ranking=cfg.eval.re_ranking,
            k1=cfg.eval.k1, k2=cfg.eval.k2, lambda_value=cfg.eval.lambda_value, max_rank=cfg.eval.max_rank,
            memory_budget_bytes=int(cfg.eval.memory_budget_gb * 2**30), exact=cfg.eval.exact,
            rerank_gemm=cfg.eval.rerank_gemm, stage_times=stage_times,
        ) if env.is_main else {}
        out[split] = (metrics, (q, g) if keep_features else None)
        del q, g, sets
    return out


class _LossMeter:
    """Sums losses on the device; ``read`` is the one deliberate host sync of the loop (plus,
    with several processes, one all-reduce so that the logged values are the mean over ranks)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.keys: list[str] = []
        self.sums: torch.Tensor | None = None  # [len(keys)], on the device
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([v.float() for v in losses.values()])  # two launches, not two per loss
        if self.sums is None:
            self.keys, self.sums = list(losses), values
        else:
            self.sums += values
        self.count += 1

    def read(self) -> dict[str, float]:
        if not self.count:
            return {}
        mean = all_reduce_mean(self.sums / self.count, self.env)
        keys, self.sums, self.count = self.keys, None, 0
        return dict(zip(keys, mean.tolist()))  # host sync


def _checkpoint_state(run: "_Run", next_index: int, pending_eval: int | None) -> dict:
    """Everything a resume needs, as tensors and plain data (loaded with weights_only=True).

    ``pending_eval``: the epoch (0-based) whose evaluation had not run when this was written; the
    checkpoint comes before the evaluation, so a failing or interrupted evaluation keeps the
    epoch just trained, and a resume evaluates that epoch again before training on.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(run.cfg),
        "task": run.task.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.trainer.scaler.state_dict(),
        # one sampler/augmentation state per rank, so each rank resumes its own stream
        "loader": gather_objects(run.loader.state_dict(), run.env),
        "world_size": run.env.world_size,
        "next_index": next_index,
        "pending_eval": pending_eval,
        "global_step": run.global_step,
        "best": dict(run.best),
        "factor_names": list(run.names),
        "classes": [int(c) for c in run.data.dataset.classes],
        "num_classes": run.data.num_classes,
        "versions": versions(),
    }


def _model_state(task, cfg, epoch: EpochPlan, metrics: dict, classes, selected_on: str) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(cfg),
        "task": task.state_dict(),
        "epoch": epoch.index + 1,
        "phase": epoch.phase,
        "selected_on": selected_on,
        "metrics": metrics,
        "classes": [int(c) for c in classes],
        "num_classes": len(classes),
        "versions": versions(),
    }


def selection_split(cfg: Config) -> str | None:
    """The split whose mAP selects ``best.pt`` (docs/METHOD.md §10, as the seed's ModelCheckpoint monitors).

    The seed monitors the non-re-ranked test mAP, or the validation mAP when there is no test
    evaluation (testing_size 0). With re-ranking during training it computes only re-ranked
    metrics, so the monitored key never exists: nothing is selected and the final model is kept.
    """
    if cfg.eval.re_ranking:
        return None
    if cfg.data.testing_size > 0:
        return "test"
    return "valid" if cfg.data.validation_size > 0 else None


def evaluations_due(cfg: Config, ep: EpochPlan, num_epochs: int) -> list[tuple[str, bool]]:
    """The splits evaluated after ``ep``, each with whether it is on the seed's cadence
    ((epoch + 1) % N == 0 within the phase). The extra test evaluation at the last epoch, when the
    epoch count is not a multiple of eval.every_epochs, is a report only: it never selects."""
    due = []
    if cfg.data.testing_size > 0:
        regular = (ep.epoch + 1) % cfg.eval.every_epochs == 0
        if regular or ep.index == num_epochs - 1:
            due.append(("test", regular))
    if cfg.data.validation_size > 0 and (ep.epoch + 1) % cfg.eval.validation_every_epochs == 0:
        due.append(("valid", True))
    return due


def _describe_selection(split: str | None, cfg: Config) -> str:
    if split == "test":
        return "best.pt: the phase-B epoch with the best test mAP (the seed's model selection)"
    if split == "valid":
        return "best.pt: the phase-B epoch with the best validation mAP (data.testing_size=0, as the seed selects)"
    if cfg.eval.re_ranking:
        return ("best.pt: the final model. With eval.re_ranking=true the seed's selection monitors a metric it "
                "does not compute, so it checkpoints nothing and keeps the final model; so does alr-fast")
    return "best.pt: the final model (no test or validation evaluation to select on)"


@dataclass
class _Run:
    """Everything one training run holds; built by ``_start`` and advanced by ``_train_epoch``."""

    cfg: Config
    dir: Path
    env: DistEnv
    device: torch.device
    data: object
    task: ReidTask
    optimizer: torch.optim.Optimizer
    trainer: Trainer
    loader: object
    plan: list[EpochPlan]
    names: list[str]
    logs: dict[str, JsonlLog]
    start: int = 0
    global_step: int = 0
    pending_eval: int | None = None
    checkpoint_epoch: int | None = None  # epochs the latest checkpoint.pt covers (None: none yet)
    selection: str | None = None
    best: dict = dataclasses.field(default_factory=lambda: {"split": None, "mAP": None, "epoch": None})
    last_metrics: dict = dataclasses.field(default_factory=dict)
    where: str = "before the first epoch"  # for the interruption report


def resume_differences(a: Config, b: Config) -> list[str]:
    """Keys (other than the resumable ones) whose values differ between two configs."""
    da, db = config_to_dict(a), config_to_dict(b)
    return [f"{s}.{k}" for s in da for k in da[s] if f"{s}.{k}" not in RESUMABLE_OVERRIDES and da[s][k] != db[s][k]]


def _sync_config_yaml(run_path: Path, cfg: Config) -> None:
    """On resume the checkpoint's config is the truth; config.yaml is reported when it says
    otherwise (it is then left as the user edited it), and rewritten when it is merely stale."""
    path = run_path / CONFIG
    if path.is_file():
        try:
            data = read_yaml_file(path, str(path))
            if not isinstance(data, dict):
                raise ConfigError(f"{path} is empty or not a mapping")
            on_disk = config_from_dict(data, source=str(path))
        except ConfigError as exc:
            log.warning("%s cannot be used (%s); the checkpoint's own config is used, the file is left as it is", path, exc)
            return
        differ = resume_differences(on_disk, cfg)
        if differ:
            od, cd = config_to_dict(on_disk), config_to_dict(cfg)
            shown = "; ".join(f"{k}: {od[k.split('.')[0]][k.split('.')[1]]!r} in the file, "
                              f"{cd[k.split('.')[0]][k.split('.')[1]]!r} in the checkpoint" for k in differ[:5])
            log.warning("%s differs from the checkpoint's config (%s). The checkpoint's config is used and the file is "
                        "left as it is; a change of these keys needs a new run", path, shown)
            return
        if on_disk == cfg:
            return
    else:
        log.warning("%s is missing: written again from the checkpoint's config", path)
    atomic_write_bytes(path, dump_config(cfg).encode())


def _restore_factor_names(run_path: Path, names: list[str], saved: list[str] | None) -> None:
    if saved is not None and list(saved) != list(names):
        raise RunDirError(f"{run_path}: the checkpoint's regularized tensors differ from the model's "
                          f"({len(saved)} saved, {len(names)} built)")
    path = run_path / FACTOR_NAMES
    try:
        if json.loads(path.read_text(encoding="utf-8")) == list(names):
            return
        log.warning("%s does not match the checkpoint: written again", path)
    except FileNotFoundError:
        log.warning("%s is missing: written again from the checkpoint", path)
    except (ValueError, UnicodeDecodeError):
        log.warning("%s is damaged: written again from the checkpoint", path)
    atomic_write_bytes(path, json.dumps(list(names)).encode())


def _report_temporaries(run_path: Path) -> None:
    removed = remove_temporaries(run_path)
    if removed:
        log.info("removed %d temporary file(s) that an interrupted write left (%s, %.1f MB)", len(removed),
                 ", ".join(n for n, _ in removed), sum(s for _, s in removed) / 1e6)


def _start(cfg: Config, run_dir: str | Path, resume: bool, lock: RunLock, advice: str | None) -> _Run:
    """Check the run directory, read the data, build model/optimizer and restore a checkpoint.

    A new run directory is created only once the data has been read and the model built: a
    typo in data.root or unreachable ImageNet weights leave nothing behind. A directory that
    holds no checkpoint (a start that failed or was stopped before its first checkpoint) does not
    block a retry: the same command reuses it, and --resume starts it again from epoch 1 with its
    config.yaml. An existing directory is owned (``lock``) from the first moment it is used.
    """
    env = init_distributed(cfg.run.device)
    main = env.is_main
    run_path = Path(run_dir)
    # only rank 0 judges the directory: the others would see the one rank 0 is about to create
    has_ckpt = resume and (run_path / CHECKPOINT).is_file()
    reused = False  # whether an earlier start left files here, seen before this one adds its lock and log
    if main:
        has_ckpt = _judge_run_dir(run_path, resume, advice)
        reused = run_path.is_dir() and any(p.name != LOCK for p in run_path.iterdir())
        if run_path.is_dir():
            lock.acquire()
            has_ckpt = _judge_run_dir(run_path, resume, advice)  # again, now that nobody else can change it
    logger = setup_logging(run_path if (lock.held and main) else None, level=logging.INFO if main else logging.WARNING)
    if lock.describe_stale():
        logger.warning("%s", lock.describe_stale())
    preflight.check_model_input(cfg)  # before any data is read
    ckpt = load_checkpoint(run_path / CHECKPOINT) if resume and has_ckpt else None
    if ckpt is not None:
        if ckpt.get("world_size", 1) != env.world_size:
            raise RunDirError(f"{run_path} was trained with {ckpt.get('world_size', 1)} processes; resume it with as many")
        saved = config_from_dict(ckpt["config"], source=f"the config stored in {run_path / CHECKPOINT}")
        differ = resume_differences(saved, cfg)
        if differ:
            raise ConfigError(f"{', '.join(differ)} cannot change when resuming {run_path} (they would change the "
                              f"schedule or the results); allowed: {', '.join(sorted(RESUMABLE_OVERRIDES))}")
        logger.info("resuming %s at epoch %d (step %d)", run_path, ckpt["next_index"] + 1, ckpt["global_step"])
    elif resume and main:
        logger.info("%s has no checkpoint yet (the start stopped before its first one): training from epoch 1 "
                    "with its config.yaml", run_path)
    torch.manual_seed(cfg.run.seed)
    if env.enabled and cfg.run.device in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)  # one GPU per rank
    else:
        device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    channels_last = cfg.run.channels_last and device.type == "cuda"
    data = build_data(cfg, device=device, dtype=input_dtype(precision, device), channels_last=channels_last,
                      progress=cfg.run.progress and main, dist_env=env)
    task = build_task(cfg, data.num_classes).to(device)  # ImageNet weights are fetched here
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg.optim, device)
    trainer = Trainer(task, optimizer, device=device, precision=precision, dist_env=env,
                      compile_mode=cfg.run.compile, regions=Regions(cfg.run.nvtx or cfg.run.profile_steps > 0))
    logs = {n: JsonlLog(run_path / f"{n}.jsonl") for n in LOGS}
    run = _Run(cfg, run_path, env, device, data, task, optimizer, trainer, data.train_loader,
               plan_epochs(cfg.optim.freeze_backbone_epochs, cfg.optim.epochs), task.regularizer.names(), logs,
               selection=selection_split(cfg))
    if ckpt is None:
        if main:
            _create_run_dir(run, lock, resume, advice, data.dataset.summary(), reused)
        barrier(env)
    else:
        _restore(run, ckpt)
    logger.info("device %s, precision %s, compile %s, %d process(es), torch %s", device, precision,
                resolve_compile(cfg.run.compile, device), env.world_size, torch.__version__)
    return run


def _judge_run_dir(run_path: Path, resume: bool, advice: str | None) -> bool:
    """Raise RunDirError if this command may not use ``run_path``; True if there is a checkpoint to resume."""
    if resume:
        return check_resume_dir(run_path)
    check_new_run_dir(run_path, advice)
    return False


def _create_run_dir(run: _Run, lock: RunLock, resume: bool, advice: str | None, summary: str,
                    reused: bool) -> None:
    """Create (or reuse: ``reused``, an earlier start's files are there) the run directory of a run
    that starts at epoch 1, under its lock."""
    run.dir.mkdir(parents=True, exist_ok=True)
    if not lock.held:
        lock.acquire()
        _judge_run_dir(run.dir, resume, advice)  # a concurrent start may have got here first
    _report_temporaries(run.dir)
    for jl in run.logs.values():  # what a stopped start logged belongs to no checkpoint
        if jl.path.exists():
            atomic_write_bytes(jl.path, b"")
    if not resume:
        atomic_write_bytes(run.dir / CONFIG, dump_config(run.cfg).encode())
    atomic_write_bytes(run.dir / FACTOR_NAMES, json.dumps(run.names).encode())
    logger = setup_logging(run.dir)
    if reused:
        logger.info("reusing %s: it holds no checkpoint, only what a start that stopped early wrote; its logs "
                    "start again%s", run.dir, "" if resume else " and config.yaml is this command's")
    logger.info("new run in %s: %s", run.dir, summary)


def load_task_state(task: torch.nn.Module, state: dict, path: Path) -> None:
    """``task.load_state_dict(state)``, or a CheckpointError that says briefly how they differ."""
    own = task.state_dict()
    missing, unexpected, reshaped = state_differences(own, state)
    if missing or unexpected or reshaped:
        parts = [f"{len(missing)} tensor(s) missing (first {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first {unexpected[0]})" if unexpected else "",
                 f"{len(reshaped)} of another shape (first {reshaped[0]}: {list(state[reshaped[0]].shape)} in the file, "
                 f"{list(own[reshaped[0]].shape)} in the model)" if reshaped else ""]
        raise CheckpointError(f"{path} does not fit the model its config describes: "
                              f"{', '.join(p for p in parts if p)}")
    task.load_state_dict(state)


def _restore(run: _Run, ckpt: dict) -> None:
    """Load a checkpoint into the run; rank 0 also tidies the directory and its logs."""
    if ckpt.get("num_classes") != run.data.num_classes:
        raise RunDirError(f"{run.dir}: the checkpoint has {ckpt.get('num_classes')} classes, the dataset {run.data.num_classes}")
    logged: dict[str, list[dict]] = {}
    if run.env.is_main:
        # read once, before anything is changed: a damaged log line stops the resume here
        logged = {name: jl.read(strict=True) for name, jl in run.logs.items()}
        _report_temporaries(run.dir)
    load_task_state(run.task, ckpt["task"], run.dir / CHECKPOINT)
    run.start, run.global_step, run.best = ckpt["next_index"], ckpt["global_step"], dict(ckpt["best"])
    run.pending_eval, run.checkpoint_epoch = ckpt.get("pending_eval"), ckpt["next_index"]
    if run.start < len(run.plan):
        run.trainer.set_backbone_frozen(run.plan[run.start].phase == "A")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.trainer.scaler.load_state_dict(ckpt["scaler"])
    loader_state = ckpt["loader"]
    run.loader.load_state_dict(loader_state[run.env.rank] if isinstance(loader_state, list) else loader_state)
    if run.env.is_main:
        _restore_factor_names(run.dir, run.names, ckpt.get("factor_names"))
        _sync_config_yaml(run.dir, run.cfg)
        for record in logged["metrics"]:  # what the summary reports as the last metrics
            if record.get("epoch", 0) <= run.start and (record.get("split") == "test" or run.selection == "valid"):
                run.last_metrics = record
    if run.pending_eval is not None:
        # the checkpoint was written before this epoch's evaluation; if the log holds all of it,
        # it finished (best.pt is written before its record), else it runs again
        done = _logged_evaluation(run.cfg, run.plan, run.pending_eval, logged["metrics"]) if run.env.is_main else None
        if run.env.enabled:
            done = gather_objects(done, run.env)[0]  # rank 0's verdict: every rank evaluates or none
        if done is not None:
            for record in sorted(done, key=lambda r: r["split"] != "test"):
                _select(run, record)
            run.pending_eval = None
    if run.env.is_main:
        # drop what was logged after the checkpoint; an evaluation still pending is logged again
        last_eval = run.start - 1 if run.pending_eval is not None else run.start
        for name, jl in run.logs.items():
            limit = last_eval if name == "metrics" else run.start
            dropped = jl.keep(lambda r, limit=limit: r.get("epoch", 0) <= limit, records=logged[name])
            if dropped:
                log.info("%s: %d record(s) written after the checkpoint dropped (they are redone)", jl.path.name, dropped)


def _enter_phase(run: _Run, ep: EpochPlan) -> None:
    frozen = ep.phase == "A"
    if run.task.model.backbone_frozen != frozen or ep.index == run.start:
        run.trainer.set_backbone_frozen(frozen)
        if not frozen and run.cfg.optim.tf_adam_step and run.global_step:
            n = start_at_global_step(run.optimizer, set(run.task.parameters()), run.global_step)
            log.info("phase B: %d parameters start at Adam step %d", n, run.global_step)


def _last_good(run: _Run) -> str:
    if run.checkpoint_epoch:
        return f"the last good checkpoint is {run.dir / CHECKPOINT} (after epoch {run.checkpoint_epoch} of {len(run.plan)})"
    return f"no checkpoint had been written yet in {run.dir}"


def _diverged(run: _Run, ep: EpochPlan, what: str) -> DivergenceError:
    return DivergenceError(
        f"training diverged: {what} in epoch {ep.index + 1}/{len(run.plan)} (phase {ep.phase}). Nothing non-finite "
        f"was written: {_last_good(run)}. {divergence_advice(run.cfg.optim, run.trainer.precision)}."
    )


def _check_losses(run: _Run, ep: EpochPlan, values: dict[str, float], first_step: int) -> None:
    """At a log read: stop on non-finite losses. Under fp16 the gradient scaler skips steps whose
    gradients overflow, so there only non-finite weights stop the run."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    steps = f"step {run.global_step}" if first_step == run.global_step else f"steps {first_step}-{run.global_step}"
    if run.trainer.precision == "fp16":
        names = nonfinite_tensors(list(run.task.named_parameters()), run.env)
        if not names:
            log.warning("fp16: non-finite losses in %s (%s); the gradient scaler skipped those steps", steps,
                        ", ".join(bad))
            return
    shown = ", ".join(f"{k}={v}" for k, v in list(bad.items())[:4])
    raise _diverged(run, ep, f"the losses are not finite ({shown}) at {steps}")


def _check_weights(run: _Run, ep: EpochPlan) -> None:
    """Before every checkpoint and evaluation: the parameters and buffers must be finite."""
    named = list(run.task.named_parameters()) + list(run.task.named_buffers())
    names = nonfinite_tensors(named, run.env)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise _diverged(run, ep, f"{len(names)} weight tensor(s) are not finite after step {run.global_step} ({shown})")


def _train_epoch(run: _Run, ep: EpochPlan, lr: float, profiler) -> dict:
    """One epoch of steps; returns the last logged losses."""
    cfg, regions = run.cfg, run.trainer.regions
    run.task.train()
    meter, t0, images, values = _LossMeter(run.env), time.perf_counter(), 0, {}
    first_step = run.global_step + 1
    batches = iter(run.loader)
    bar = tqdm(range(len(run.loader)), desc=f"epoch {ep.index + 1}/{len(run.plan)} ({ep.phase})",
               disable=not (cfg.run.progress and run.env.is_main), leave=False)
    try:
        for step in bar:
            run.where = f"in epoch {ep.index + 1}/{len(run.plan)} (step {run.global_step + 1})"
            with regions("data"):
                batch = next(batches)
            meter.add(run.trainer.train_step(batch))
            run.global_step += 1
            images += batch[0].shape[0]
            if profiler is not None:
                profiler.step()
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == len(run.loader):
                values = meter.read()  # the deliberate host sync of the loop
                if run.env.is_main:
                    run.logs["losses"].append({"epoch": ep.index + 1, "phase": ep.phase, "step": run.global_step, "lr": lr, **values})
                _check_losses(run, ep, values, first_step)
                first_step = run.global_step + 1
                bar.set_postfix(loss=f"{values['total']:.3f}")
    finally:
        bar.close()
        if hasattr(batches, "close"):
            batches.close()  # on a stop, let the loader's iterator unwind now, not at garbage collection
    rate = images * run.env.world_size / max(time.perf_counter() - t0, 1e-9)
    log.info("epoch %d/%d phase %s lr %.2e: loss %.4f, %.0f images/s", ep.index + 1, len(run.plan), ep.phase, lr,
             values.get("total", float("nan")), rate)
    return values


def _evaluate_epoch(run: _Run, ep: EpochPlan, due: list[tuple[str, bool]]) -> dict:
    """Evaluate the splits ``due`` after ``ep``; the selecting split may replace best.pt."""
    if not due:
        return {}
    cfg = run.cfg
    run.where = f"in the evaluation after epoch {ep.index + 1}/{len(run.plan)}"
    with run.trainer.regions("evaluation"):
        results = evaluate_splits(run.task, run.data.eval_loaders, cfg, cfg.run.progress and run.env.is_main,
                                  splits=[s for s, _ in due], dist_env=run.env)
    if not run.env.is_main:
        return results
    regular = dict(due)
    for split, (m, _) in results.items():
        record = {"epoch": ep.index + 1, "phase": ep.phase, "split": split, **m}
        if not regular[split]:
            record["report_only"] = True  # the extra last-epoch evaluation: never selects (as the seed)
        log.info("%s at epoch %d%s: %s", split, ep.index + 1, " (report only)" if not regular[split] else "",
                 format_metrics(m))
        if _select(run, record):  # best.pt before the record: a logged evaluation is a finished one
            save_checkpoint(run.dir / BEST, _model_state(run.task, cfg, ep, m, run.data.dataset.classes,
                                                         f"{split} mAP"))
        run.logs["metrics"].append(record)
    return results


def _select(run: _Run, record: dict) -> bool:
    """Apply the seed's model selection to one metrics record; True when it is the new best.
    Also keeps ``last_metrics`` (the latest test record, or validation without a test split)."""
    split = record["split"]
    if split == "test" or run.selection == "valid":
        run.last_metrics = record
    best = run.best["mAP"]
    if (split != run.selection or record.get("report_only") or record["phase"] != "B"
            or (best is not None and not record["mAP"] > best)):
        return False
    run.best = {"split": split, "mAP": record["mAP"], "epoch": record["epoch"]}
    return True


def _logged_evaluation(cfg: Config, plan: list[EpochPlan], index: int, metrics: list[dict]) -> list[dict] | None:
    """The records of epoch ``index`` (0-based) among the ``metrics`` log's when all its due
    evaluations were logged."""
    due = {s for s, _ in evaluations_due(cfg, plan[index], len(plan))}
    records = [r for r in metrics if r.get("epoch") == index + 1]
    return records if {r.get("split") for r in records} >= due else None


def training_finished(run_dir: str | Path) -> bool:
    """Whether the run in ``run_dir`` has trained and evaluated every epoch (reads no tensors)."""
    run = Path(run_dir)
    state = peek_checkpoint(run / CHECKPOINT)
    cfg = config_from_dict(state["config"], source=f"the config stored in {run / CHECKPOINT}")
    plan = plan_epochs(cfg.optim.freeze_backbone_epochs, cfg.optim.epochs)
    if state["next_index"] < len(plan):
        return False
    pending = state.get("pending_eval")
    return pending is None or _logged_evaluation(cfg, plan, pending, JsonlLog(run / "metrics.jsonl").read(strict=True)) is not None


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False, resume_command: str | None = None,
        advice: str | None = None) -> dict:
    """Train ``cfg`` in ``run_dir`` (new, or resumed from its checkpoint). Returns a summary.

    Under torchrun every rank trains on its own P x K stream; rank 0 writes the run directory and
    owns it (``run.lock``) until it returns. SIGINT, SIGTERM and a full disk end in ``RunStopped``
    (whose message says how to continue: ``resume_command``, by default ``alr-fast train --resume
    DIR``); non-finite losses or weights in ``DivergenceError``, before anything non-finite is
    written. ``advice`` replaces the hint of the refusal of a directory that holds a run.
    """
    lock = RunLock(run_dir)
    run = None
    with StopSignals() as signals:
        try:
            run = _start(cfg, run_dir, resume, lock, advice)
            return _fit(run)
        except (KeyboardInterrupt, Terminated, OSError, RuntimeError) as exc:
            signum = signals.signal_of(exc)
            if signum is None and not is_disk_full(exc):
                raise
            raise _stopped(exc, signum, Path(run_dir), run, resume_command) from None
        finally:
            lock.release()


def _stopped(exc: BaseException, signum: int | None, run_dir: Path, run: _Run | None, command: str | None) -> RunStopped:
    command = command or f"alr-fast train --resume {run_dir}"
    if signum is not None:
        what, code = f"interrupted by {signal.Signals(signum).name}", SIGNAL_EXIT[signum]
    else:
        what = f"stopped: {exc.strerror} ({exc.filename})" if exc.filename else f"stopped: {exc.strerror or exc}"
        code = EXIT_DISK_FULL
    where = run.where if run is not None else "while starting"
    if run is not None and run.checkpoint_epoch:
        state = (f"The last checkpoint is {run_dir / CHECKPOINT} (after epoch {run.checkpoint_epoch} of {len(run.plan)}); "
                 f"continue with: {command}")
    elif (run_dir / CHECKPOINT).is_file():
        state = f"The last checkpoint is {run_dir / CHECKPOINT}; continue with: {command}"
    elif (run_dir / CONFIG).is_file():
        state = f"No checkpoint was written yet; start it again with: {command}"
    else:
        state = "Nothing was written; run the same command again"
    free = " Free some disk space first." if signum is None else ""
    return RunStopped(f"{what} {where}. {state}.{free}", code)


def _fit(run: _Run) -> dict:
    cfg, env, main = run.cfg, run.env, run.env.is_main
    log.info("%d regularized tensors, %.1fM parameters, %d classes; %d epochs of %d steps (phase A %d, phase B %d)",
             len(run.names), sum(p.numel() for p in run.task.model.parameters()) / 1e6, run.data.num_classes,
             len(run.plan), len(run.loader), cfg.optim.freeze_backbone_epochs, cfg.optim.epochs)
    log.info("%s", _describe_selection(run.selection, cfg))
    sched = schedule_from_config(cfg.optim)
    profile = cfg.run.profile_steps > 0 and run.start < len(run.plan)
    profiler = step_profiler(run.dir / "profile" / f"rank{env.rank}", cfg.run.profile_steps) if profile else None
    if run.pending_eval is not None:  # the checkpoint was written before this evaluation ran
        ep = run.plan[run.pending_eval]
        log.info("evaluating epoch %d first: the run stopped after its checkpoint, before its evaluation was logged",
                 ep.index + 1)
        if _evaluate_epoch(run, ep, evaluations_due(cfg, ep, len(run.plan))) and main and cfg.run.plots:
            _plots(run.dir)
    for ep in run.plan[run.start:]:
        _enter_phase(run, ep)
        lr = learning_rate(ep.epoch, **sched)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if profiler is not None:
            profiler.start()
        _train_epoch(run, ep, lr, profiler)
        if profiler is not None:
            profiler.stop()
            log.info("profile of %d steps written to %s", cfg.run.profile_steps, run.dir / "profile")
            profiler = None
        run.where = f"after epoch {ep.index + 1}/{len(run.plan)}"
        _check_weights(run, ep)  # nothing non-finite reaches a checkpoint or an evaluation
        if main:
            factors = run.task.regularizer.effective_factors().tolist()
            thetas = torch.stack(list(run.task.regularizer.thetas)).tolist()
            run.logs["factors"].append({"epoch": ep.index + 1, "phase": ep.phase, "factors": factors, "theta": thetas})
        due = evaluations_due(cfg, ep, len(run.plan))
        is_last = ep.index == len(run.plan) - 1
        if (ep.index + 1) % cfg.run.checkpoint_every == 0 or is_last:
            # before the evaluation: an evaluation that fails or is interrupted keeps this epoch
            state = _checkpoint_state(run, ep.index + 1, ep.index if due else None)  # collective (loader states)
            if main:
                save_checkpoint(run.dir / CHECKPOINT, state)
            run.checkpoint_epoch = ep.index + 1
        results = _evaluate_epoch(run, ep, due)
        if main and cfg.run.plots and (results or is_last):
            _plots(run.dir)
    final = run.plan[-1]
    if main and not (run.dir / BEST).is_file():  # the seed saves the final model when nothing was selected
        save_checkpoint(run.dir / BEST, _model_state(run.task, cfg, final, run.last_metrics, run.data.dataset.classes,
                                                     "final model"))
        log.info("best.pt: the final model (epoch %d)", final.index + 1)
    barrier(env)
    best = dict(run.best) if run.best["epoch"] is not None else {"split": None, "epoch": final.index + 1,
                                                                 "selected_on": "final model"}
    summary = {"run_dir": str(run.dir), "best": best, "last": {k: v for k, v in run.last_metrics.items() if k != "cmc"}}
    log.info("done: %s", summary)
    shutdown(env)
    return summary


def _plots(run: Path) -> None:
    try:
        from .plots import plot_run
    except ImportError as exc:  # matplotlib missing: training results are unaffected
        log.warning("plots skipped: %s", exc)
        return
    plot_run(run)


def _check_resume_overrides(overrides: list[str]) -> None:
    for text in overrides:
        key, _ = parse_override(text)
        if key not in RESUMABLE_OVERRIDES:
            raise ConfigError(
                f"{key} cannot change when resuming (it would change the schedule or the results); "
                f"allowed: {', '.join(sorted(RESUMABLE_OVERRIDES))}"
            )


def config_for_resume(run_dir: str | Path, overrides: list[str]) -> Config:
    """The run's config, with only overrides that keep the schedule and results.

    With a checkpoint, the config stored in it is the truth (config.yaml is only compared with
    it, when the run starts); without one (a start that stopped before its first checkpoint),
    the directory's config.yaml, which must then be a complete, readable config.
    """
    run = Path(run_dir)
    _check_resume_overrides(overrides)
    if check_resume_dir(run):
        cfg = config_from_dict(read_checkpoint_config(run / CHECKPOINT), source=f"the config stored in {run / CHECKPOINT}")
    else:
        path = run / CONFIG
        data = read_yaml_file(path, str(path))
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{path} is empty or not a mapping: it should hold the resolved config of the run "
                              f"started in {run}")
        cfg = config_from_dict(data, source=str(path))
    return apply_overrides(cfg, overrides)


# keys an evaluation of an alr-fast checkpoint may not change: they define the network in it
EVAL_FIXED_PREFIXES = ("model.",)
EVAL_INPUT_KEYS = ("data.height", "data.width")


def _evaluation_config(state: dict, path: Path, overrides: list[str], allow_input_change: bool) -> Config:
    """The checkpoint's config with the overrides an evaluation may make."""
    cfg = config_from_dict(state["config"], source=f"the config stored in {path}")
    for text in overrides:
        key, _ = parse_override(text)
        if key.startswith(EVAL_FIXED_PREFIXES):
            raise ConfigError(f"{key} cannot be overridden when evaluating {path}: the checkpoint fixes the model "
                              f"(its config says {key}=... as trained)")
        if key in EVAL_INPUT_KEYS and not allow_input_change:
            raise ConfigError(f"{key} would change the input size the model in {path} was trained with "
                              f"({cfg.data.height}x{cfg.data.width}); pass --allow-input-change to evaluate it anyway")
    return apply_overrides(cfg, overrides)


def _describe_checkpoint(path: Path, state: dict) -> str:
    if "next_index" in state:
        return f"{path}: the latest checkpoint, after epoch {state['next_index']}"
    return (f"{path}: epoch {state.get('epoch')} (phase {state.get('phase')}), selected on "
            f"{state.get('selected_on', 'test mAP')}")


def evaluate_checkpoint(
    checkpoint: str | Path,
    overrides: list[str],
    *,
    re_ranking: bool | None = None,
    out: str | Path | None = None,
    config: Config | None = None,
    allow_input_change: bool = False,
) -> dict:
    """The evaluation-only mode (docs/METHOD.md §10): load a checkpoint, extract features, evaluate the
    full test set (testing_size 1), and write ``evaluation-<time>.json`` next to the checkpoint.

    ``config`` (``--config`` of the CLI, overrides applied) describes a model file that carries
    no alr-fast config: one of the seed's Keras ``training_model.h5`` (``.h5``/``.hdf5``), with a
    keras recipe such as market1501_resnet50_keras. An alr-fast checkpoint carries its own, and a
    ``config`` is then refused.
    The report says which file and epoch were evaluated. A run directory that receives the
    report is locked for the evaluation's duration.
    """
    setup_logging(None)
    from .keras_weights import is_keras_file

    if is_keras_file(checkpoint):
        return _evaluate_keras_file(Path(checkpoint), config, overrides, re_ranking, out)
    path, note = resolve_checkpoint(checkpoint)
    if config is not None:
        raise ConfigError(f"--config cannot be used with {path}: an alr-fast checkpoint carries the config it was "
                          f"trained with. Overrides of data.root, run.device, eval.* and the like still apply")
    with _report_folder(out, path) as folder:
        state = load_checkpoint(path)
        cfg = _evaluation_config(state, path, overrides, allow_input_change)
        if note:
            log.info("%s", note)
        what = _describe_checkpoint(path, state)
        log.info("evaluating %s", what)
        return _evaluate_state(state, cfg, path, what, re_ranking, folder)


@contextlib.contextmanager
def _report_folder(out: str | Path | None, path: Path):
    """The folder an evaluation report goes to (``out``, else the evaluated file's), held under
    the run lock when it is a run directory, whose owner could be writing there."""
    folder = Path(out) if out else path.parent
    lock = RunLock(folder)
    if is_run_dir(folder):
        lock.acquire(advice="or write the report elsewhere with --out DIR")
    try:
        yield folder
    finally:
        lock.release()


def _evaluate_keras_file(path: Path, config: Config | None, overrides: list[str], re_ranking: bool | None,
                         out: str | Path | None) -> dict:
    """``alr-fast evaluate training_model.h5 --config RECIPE``: the seed's released model as it is.
    Without ``config`` the defaults plus ``overrides`` describe it."""
    from .config import load_config

    config = config if config is not None else load_config(None, overrides)
    if config.model.backbone_style != "keras":
        raise ConfigError(f"{path} is a Keras model of the original code, which carries no alr-fast config: it needs "
                          f"model.backbone_style=keras, best through the recipe it was trained with, e.g. "
                          f"--config market1501_resnet50_keras data.root=...")
    if not path.is_file():
        raise RunDirError(f"Keras model file {path} does not exist")
    with _report_folder(out, path) as folder:
        what = f"{path}: a Keras training model of the original code ({config.model.backbone}, keras style)"
        log.info("evaluating %s", what)
        return _evaluate_state(None, config, path, what, re_ranking, folder)


def _evaluate_state(state: dict | None, cfg: Config, path: Path, what: str, re_ranking: bool | None,
                    folder: Path) -> dict:
    """Evaluate the model in ``state`` (an alr-fast checkpoint), or in the Keras file ``path`` when
    ``state`` is None, on the full test set of ``cfg``; write the report into ``folder``."""
    if cfg.data.testing_size != 1.0:
        log.info("evaluation uses the full test set: data.testing_size=%s ignored", cfg.data.testing_size)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, testing_size=1.0, validation_size=0.0),
        model=dataclasses.replace(cfg.model, pretrained="none"),
        eval=dataclasses.replace(cfg.eval, re_ranking=cfg.eval.re_ranking if re_ranking is None else re_ranking),
    )
    preflight.check_model_input(cfg)
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    channels_last = cfg.run.channels_last and device.type == "cuda"  # as in training
    data = build_data(cfg, device=device, dtype=input_dtype(precision, device), channels_last=channels_last,
                      train=False, progress=cfg.run.progress)
    if state is None:  # one of the seed's Keras training_model.h5
        from .keras_weights import load_keras_training_model

        task, info = load_keras_training_model(path, cfg, log)
        task = task.to(device)
        if info.num_classes != data.num_classes:
            log.info("note: the file has %d classes, the dataset %d training identities (this matters only for "
                     "training)", info.num_classes, data.num_classes)
    else:
        task = build_task(cfg, int(state["num_classes"])).to(device)
        load_task_state(task, state["task"], path)
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    results = evaluate_splits(task, data.eval_loaders, cfg, progress=cfg.run.progress, splits=["test"],
                              keep_features=cfg.eval.save_features)
    m, features = results["test"]
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    epoch = None if state is None else state.get("epoch", state.get("next_index"))
    report = {"checkpoint": str(path), "evaluated": what, "epoch": epoch, "metrics": strict_record(m),
              "config": config_to_dict(cfg), "versions": versions()}
    if state is None:
        report["keras"] = {"classes": info.num_classes, "dataset_classes": data.num_classes, "tensors": info.tensors,
                           "thetas": len(info.thetas), "regularized": len(task.regularizer), "notes": info.notes}
    atomic_write_bytes(folder / f"evaluation-{stamp}.json", json.dumps(report, indent=1, allow_nan=False).encode())
    if features is not None:
        q, g = features
        np.savez(folder / f"features-{stamp}.npz", query=q.features.cpu().numpy(), gallery=g.features.cpu().numpy(),
                 query_pids=q.pids, gallery_pids=g.pids, query_camids=q.camids, gallery_camids=g.camids)
    try:
        from .plots import plot_cmc

        plot_cmc(m, folder / f"cmc-{stamp}.png")
    except ImportError:
        pass
    m["report"] = str(folder / f"evaluation-{stamp}.json")
    m["checkpoint"], m["evaluated"], m["epoch"] = str(path), what, epoch
    return m
