"""The training loop: ``Trainer.train_step(batch) -> dict of losses`` and a short ``fit``.

Host-device synchronisation happens only where it is deliberate: reading the accumulated losses
every ``run.log_every`` steps, the per-epoch factor log, evaluation and checkpointing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import Config, config_from_dict, config_to_dict, dump_config
from .data import build_data
from .evaluation import FeatureExtractor, evaluate_features, format_metrics
from .runs import (
    BEST, CHECKPOINT, CONFIG, JsonlLog, RunDirError, atomic_write_bytes, load_checkpoint, prepare_run_dir,
    save_checkpoint, setup_logging,
)
from .schedule import learning_rate, schedule_from_config
from .distributed import DistEnv, all_reduce_mean, barrier, gather_numpy, gather_objects, gather_rows, init_distributed, shutdown
from .evaluation import FeatureSet
from .profiling import Regions, step_profiler
from .task import ReidTask, build_task

log = logging.getLogger("alr_fast")
FACTOR_NAMES = "factor_names.json"

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
    optimizer state yet the state of a parameter first seen at ``step`` (SPEC B.9.1)."""
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
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def evaluate_splits(
    task: ReidTask, loaders: dict, cfg: Config, trainer_autocast=None, progress: bool = False, splits=None,
    dist_env: DistEnv | None = None, *, keep_features: bool = False, stage_times: dict | None = None,
) -> dict:
    """Evaluate the model on each (query, gallery) pair of ``loaders``.

    Extraction runs at ``eval.precision`` (``trainer_autocast`` is ignored: the training step's
    autocast is not the evaluation's; the argument stays for existing callers), captured in a
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


def _checkpoint_state(run: "_Run", next_index: int) -> dict:
    return {
        "format": "alr-fast/1",
        "config": config_to_dict(run.cfg),
        "task": run.task.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.trainer.scaler.state_dict(),
        # one sampler/augmentation state per rank, so each rank resumes its own stream
        "loader": gather_objects(run.loader.state_dict(), run.env),
        "world_size": run.env.world_size,
        "next_index": next_index,
        "global_step": run.global_step,
        "best": run.best,
        "factor_names": run.names,
        "classes": np.asarray(run.data.dataset.classes),
        "num_classes": run.data.num_classes,
        "versions": versions(),
    }


def _model_state(task, cfg, epoch: EpochPlan, metrics: dict, classes) -> dict:
    return {
        "format": "alr-fast/1",
        "config": config_to_dict(cfg),
        "task": task.state_dict(),
        "epoch": epoch.index + 1,
        "phase": epoch.phase,
        "metrics": metrics,
        "classes": np.asarray(classes),
        "num_classes": len(classes),
        "versions": versions(),
    }


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
    best: dict = dataclasses.field(default_factory=lambda: {"mAP": -1.0, "epoch": None})
    last_metrics: dict = dataclasses.field(default_factory=dict)


def _start(cfg: Config, run_dir: str | Path, resume: bool) -> _Run:
    """Check the run directory, read the data, build model/optimizer and restore a checkpoint.

    The run directory is created only once the data has been read: a typo in data.root must not
    leave a half-made run directory behind that blocks the corrected command.
    """
    env = init_distributed(cfg.run.device)
    main = env.is_main
    # only rank 0 judges the directory: the others would see the one rank 0 is about to create
    run_path = prepare_run_dir(run_dir, resume=resume, create=False) if main else Path(run_dir)
    logger = setup_logging(run_path if (resume and main) else None, level=logging.INFO if main else logging.WARNING)
    ckpt = load_checkpoint(run_path / CHECKPOINT) if resume else None
    if ckpt is not None:
        if ckpt.get("world_size", 1) != env.world_size:
            raise RunDirError(f"{run_path} was trained with {ckpt.get('world_size', 1)} processes; resume it with as many")
        logger.info("resuming %s at epoch %d (step %d)", run_path, ckpt["next_index"] + 1, ckpt["global_step"])
    torch.manual_seed(cfg.run.seed)
    if env.enabled and cfg.run.device in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)  # one GPU per rank
    else:
        device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    channels_last = cfg.run.channels_last and device.type == "cuda"
    data = build_data(cfg, device=device, dtype=input_dtype(precision, device), channels_last=channels_last,
                      progress=cfg.run.progress and main, dist_env=env)
    if not resume:
        if main:
            prepare_run_dir(run_path)
            logger = setup_logging(run_path)
            atomic_write_bytes(run_path / CONFIG, dump_config(cfg).encode())
            logger.info("new run in %s: %s", run_path, data.dataset.summary())
        barrier(env)
    logger.info("device %s, precision %s, compile %s, %d process(es), torch %s", device, precision,
                resolve_compile(cfg.run.compile, device), env.world_size, torch.__version__)
    task = build_task(cfg, data.num_classes).to(device)
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg.optim, device)
    trainer = Trainer(task, optimizer, device=device, precision=precision, dist_env=env,
                      compile_mode=cfg.run.compile, regions=Regions(cfg.run.nvtx or cfg.run.profile_steps > 0))
    logs = {n: JsonlLog(run_path / f"{n}.jsonl") for n in ("metrics", "losses", "factors")}
    run = _Run(cfg, run_path, env, device, data, task, optimizer, trainer, data.train_loader,
               plan_epochs(cfg.optim.freeze_backbone_epochs, cfg.optim.epochs), task.regularizer.names(), logs)
    if ckpt is None:
        if main:
            atomic_write_bytes(run_path / FACTOR_NAMES, json.dumps(run.names).encode())
        return run
    if ckpt.get("num_classes") != data.num_classes:
        raise RunDirError(f"{run_path}: the checkpoint has {ckpt.get('num_classes')} classes, the dataset {data.num_classes}")
    task.load_state_dict(ckpt["task"])
    run.start, run.global_step, run.best = ckpt["next_index"], ckpt["global_step"], ckpt["best"]
    if run.start < len(run.plan):
        trainer.set_backbone_frozen(run.plan[run.start].phase == "A")
    optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    loader_state = ckpt["loader"]
    run.loader.load_state_dict(loader_state[env.rank] if isinstance(loader_state, list) else loader_state)
    if main:
        for jl in logs.values():  # drop what was logged after the checkpoint
            jl.keep(lambda r: r.get("epoch", 0) <= run.start)
    return run


def _enter_phase(run: _Run, ep: EpochPlan) -> None:
    frozen = ep.phase == "A"
    if run.task.model.backbone_frozen != frozen or ep.index == run.start:
        run.trainer.set_backbone_frozen(frozen)
        if not frozen and run.cfg.optim.tf_adam_step and run.global_step:
            n = start_at_global_step(run.optimizer, set(run.task.parameters()), run.global_step)
            log.info("phase B: %d parameters start at Adam step %d", n, run.global_step)


def _train_epoch(run: _Run, ep: EpochPlan, lr: float, profiler) -> dict:
    """One epoch of steps; returns the last logged losses."""
    cfg, regions = run.cfg, run.trainer.regions
    run.task.train()
    meter, t0, images, values = _LossMeter(run.env), time.perf_counter(), 0, {}
    batches = iter(run.loader)
    bar = tqdm(range(len(run.loader)), desc=f"epoch {ep.index + 1}/{len(run.plan)} ({ep.phase})",
               disable=not (cfg.run.progress and run.env.is_main), leave=False)
    for step in bar:
        with regions("data"):
            batch = next(batches)
        meter.add(run.trainer.train_step(batch))
        run.global_step += 1
        images += batch[0].shape[0]
        if profiler is not None:
            profiler.step()
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == len(run.loader):
            values = meter.read()
            if run.env.is_main:
                run.logs["losses"].append({"epoch": ep.index + 1, "phase": ep.phase, "step": run.global_step, "lr": lr, **values})
            bar.set_postfix(loss=f"{values['total']:.3f}")
    rate = images * run.env.world_size / max(time.perf_counter() - t0, 1e-9)
    log.info("epoch %d/%d phase %s lr %.2e: loss %.4f, %.0f images/s", ep.index + 1, len(run.plan), ep.phase, lr,
             values.get("total", float("nan")), rate)
    return values


def _evaluate_epoch(run: _Run, ep: EpochPlan) -> dict:
    cfg = run.cfg
    is_last = ep.index == len(run.plan) - 1
    wanted = [s for s, on in (("test", (ep.epoch + 1) % cfg.eval.every_epochs == 0 or is_last),
                              ("valid", (ep.epoch + 1) % cfg.eval.validation_every_epochs == 0)) if on]
    if not wanted:
        return {}
    with run.trainer.regions("evaluation"):
        results = evaluate_splits(run.task, run.data.eval_loaders, cfg, run.trainer.autocast,
                                  cfg.run.progress and run.env.is_main, splits=wanted, dist_env=run.env)
    if not run.env.is_main:
        return results
    for split, (m, _) in results.items():
        record = {"epoch": ep.index + 1, "phase": ep.phase, "split": split, **m}
        run.logs["metrics"].append(record)
        log.info("%s at epoch %d: %s", split, ep.index + 1, format_metrics(m))
        if split == "test":
            run.last_metrics = record
            if ep.phase == "B" and m["mAP"] > run.best["mAP"]:
                run.best = {"mAP": m["mAP"], "epoch": ep.index + 1}
                save_checkpoint(run.dir / BEST, _model_state(run.task, cfg, ep, m, run.data.dataset.classes))
    return results


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Train ``cfg`` in ``run_dir`` (new, or resumed from its checkpoint). Returns a summary.

    Under torchrun every rank trains on its own P x K stream; rank 0 writes the run directory.
    """
    run = _start(cfg, run_dir, resume)
    env, main = run.env, run.env.is_main
    log.info("%d regularized tensors, %.1fM parameters, %d classes; %d epochs of %d steps (phase A %d, phase B %d)",
             len(run.names), sum(p.numel() for p in run.task.model.parameters()) / 1e6, run.data.num_classes,
             len(run.plan), len(run.loader), cfg.optim.freeze_backbone_epochs, cfg.optim.epochs)
    sched = schedule_from_config(cfg.optim)
    profile = cfg.run.profile_steps > 0 and run.start < len(run.plan)
    profiler = step_profiler(run.dir / "profile" / f"rank{env.rank}", cfg.run.profile_steps) if profile else None
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
        if main:
            factors = run.task.regularizer.effective_factors().tolist()
            thetas = torch.stack(list(run.task.regularizer.thetas)).tolist()
            run.logs["factors"].append({"epoch": ep.index + 1, "phase": ep.phase, "factors": factors, "theta": thetas})
        results = _evaluate_epoch(run, ep)
        is_last = ep.index == len(run.plan) - 1
        if (ep.index + 1) % cfg.run.checkpoint_every == 0 or is_last:
            state = _checkpoint_state(run, ep.index + 1)  # collective: every rank contributes its loader state
            if main:
                save_checkpoint(run.dir / CHECKPOINT, state)
        if main and cfg.run.plots and (results or is_last):
            _plots(run.dir)
    if main and not (run.dir / BEST).is_file() and run.plan:  # the seed saves the final model when nothing was selected
        save_checkpoint(run.dir / BEST, _model_state(run.task, cfg, run.plan[-1], run.last_metrics, run.data.dataset.classes))
    barrier(env)
    summary = {"run_dir": str(run.dir), "best": run.best, "last": {k: v for k, v in run.last_metrics.items() if k != "cmc"}}
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


def config_for_resume(run_dir: str | Path, overrides: list[str]) -> Config:
    """The run's own resolved config, with only overrides that keep the schedule and results."""
    import yaml

    from .config import ConfigError, apply_overrides, parse_override

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: {path} is missing")
    cfg = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))
    for text in overrides:
        key, _ = parse_override(text)
        if key not in RESUMABLE_OVERRIDES:
            raise ConfigError(
                f"{key} cannot change when resuming (it would change the schedule or the results); "
                f"allowed: {', '.join(sorted(RESUMABLE_OVERRIDES))}"
            )
    return apply_overrides(cfg, overrides)


def evaluate_checkpoint(checkpoint: str | Path, overrides: list[str], *, re_ranking: bool | None = None,
                        out: str | Path | None = None, config: str | None = None) -> dict:
    """The evaluation-only mode (SPEC B.10.5): load a checkpoint, extract features, evaluate the
    full test set (testing_size 1), and write ``evaluation-<time>.json`` next to the checkpoint.

    A Keras ``.h5``/``.hdf5`` file is one of the seed's ``training_model.h5``: its config is
    ``config`` (a recipe name or file, e.g. market1501_resnet50_keras) plus ``overrides``."""
    from .config import apply_overrides, load_config
    from .keras_weights import is_keras_file

    keras = is_keras_file(checkpoint)
    if keras:
        state, cfg = None, load_config(config, overrides)
    else:
        state = load_checkpoint(checkpoint)
        cfg = config_from_dict(state["config"], source=str(checkpoint))
        cfg = apply_overrides(cfg, overrides)
    if cfg.data.testing_size != 1.0:
        log.info("evaluation uses the full test set: data.testing_size=%s ignored", cfg.data.testing_size)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, testing_size=1.0, validation_size=0.0),
        model=dataclasses.replace(cfg.model, pretrained="none"),
        eval=dataclasses.replace(cfg.eval, re_ranking=cfg.eval.re_ranking if re_ranking is None else re_ranking),
    )
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    channels_last = cfg.run.channels_last and device.type == "cuda"  # as in training
    data = build_data(cfg, device=device, dtype=input_dtype(precision, device), channels_last=channels_last,
                      train=False, progress=cfg.run.progress)
    if keras:
        from .keras_weights import load_keras_training_model

        task, info = load_keras_training_model(checkpoint, cfg, log)
        task = task.to(device)
        if info.num_classes != data.num_classes:
            log.info("note: the file has %d classes, the dataset %d training identities (this matters only for "
                     "training)", info.num_classes, data.num_classes)
    else:
        task = build_task(cfg, int(state["num_classes"])).to(device)
        task.load_state_dict(state["task"])
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    results = evaluate_splits(task, data.eval_loaders, cfg, progress=cfg.run.progress, splits=["test"],
                              keep_features=cfg.eval.save_features)
    m, features = results["test"]
    target = Path(checkpoint)
    folder = Path(out) if out else (target if target.is_dir() else target.parent)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"checkpoint": str(checkpoint), "metrics": m, "config": config_to_dict(cfg), "versions": versions()}
    if keras:
        report["keras"] = {"classes": info.num_classes, "dataset_classes": data.num_classes, "tensors": info.tensors,
                           "thetas": len(info.thetas), "regularized": len(task.regularizer), "notes": info.notes}
    atomic_write_bytes(folder / f"evaluation-{stamp}.json", json.dumps(report, indent=1).encode())
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
    return m
