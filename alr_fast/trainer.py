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
from .evaluation import evaluate_features, extract_features, format_metrics
from .runs import BEST, CHECKPOINT, CONFIG, JsonlLog, atomic_write_bytes, load_checkpoint, prepare_run_dir, save_checkpoint, setup_logging
from .schedule import learning_rate, schedule_from_config
from .task import ReidTask, build_task

log = logging.getLogger("alr_fast")
FACTOR_NAMES = "factor_names.json"

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# keys that may change when a run is resumed: they do not alter the schedule or the results
RESUMABLE_OVERRIDES = {
    "data.root", "data.num_workers", "data.verify_images", "run.device", "run.progress", "run.log_every", "run.plots",
}


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


class Trainer:
    """One optimisation step of a ReidTask; precision is an argument, not a subclass."""

    def __init__(self, task: ReidTask, optimizer: torch.optim.Optimizer, *, device: torch.device, precision: str = "fp32") -> None:
        if precision not in ("fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"precision must be fp32, bf16 or fp16; got {precision!r}")
        self.task, self.optimizer, self.device, self.precision = task, optimizer, device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """batch = (images [B,3,H,W], labels [B], camids [B]) -> detached losses on the device."""
        images, labels, _ = batch
        with self.autocast():
            losses = self.task(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: v.detach() for k, v in losses.items()}


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


def evaluate_splits(task: ReidTask, loaders: dict, cfg: Config, trainer_autocast, progress: bool, splits=None) -> dict:
    """Evaluate the model on each (query, gallery) pair of ``loaders``.

    Returns {split: (metrics, (query FeatureSet, gallery FeatureSet))}."""
    out = {}
    for split, (qloader, gloader) in loaders.items():
        if splits is not None and split not in splits:
            continue
        q = extract_features(task.model, qloader, flip=cfg.eval.flip, precision_ctx=trainer_autocast, progress=progress, desc=f"{split} query")
        g = extract_features(task.model, gloader, flip=cfg.eval.flip, precision_ctx=trainer_autocast, progress=progress, desc=f"{split} gallery")
        metrics = evaluate_features(
            q, g, metric=cfg.eval.metric, re_ranking=cfg.eval.re_ranking,
            k1=cfg.eval.k1, k2=cfg.eval.k2, lambda_value=cfg.eval.lambda_value, max_rank=cfg.eval.max_rank,
        )
        out[split] = (metrics, (q, g))
    return out


class _LossMeter:
    """Sums losses on the device; ``read`` is the one deliberate host sync of the loop."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def read(self) -> dict[str, float]:
        if not self.count:
            return {}
        keys = list(self.sums)
        values = (torch.stack([self.sums[k].float() for k in keys]) / self.count).tolist()  # host sync
        self.sums, self.count = {}, 0
        return dict(zip(keys, values))


def _checkpoint_state(task, optimizer, trainer, loader, cfg, next_index, global_step, best, names, classes) -> dict:
    return {
        "format": "alr-fast/1",
        "config": config_to_dict(cfg),
        "task": task.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "loader": loader.state_dict(),
        "next_index": next_index,
        "global_step": global_step,
        "best": best,
        "factor_names": names,
        "classes": np.asarray(classes),
        "num_classes": len(classes),
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


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Train ``cfg`` in ``run_dir`` (new, or resumed from its checkpoint). Returns a summary."""
    # check the run directory first, create it only once the data has been read: a typo in
    # data.root must not leave a half-made run directory behind that blocks the corrected command
    run = prepare_run_dir(run_dir, resume=resume, create=False)
    logger = setup_logging(run if resume else None)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run / CHECKPOINT)
        logger.info("resuming %s at epoch %d (step %d)", run, ckpt["next_index"] + 1, ckpt["global_step"])
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    channels_last = cfg.run.channels_last and device.type == "cuda"
    data = build_data(cfg, device=device, channels_last=channels_last, progress=cfg.run.progress)
    if not resume:
        prepare_run_dir(run)
        logger = setup_logging(run)
        atomic_write_bytes(run / CONFIG, dump_config(cfg).encode())
        logger.info("new run in %s: %s", run, data.dataset.summary())
    logger.info("device %s, precision %s, torch %s", device, precision, torch.__version__)
    task = build_task(cfg, data.num_classes).to(device)
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg.optim, device)
    trainer = Trainer(task, optimizer, device=device, precision=precision)
    loader = data.train_loader
    names = task.regularizer.names()
    if ckpt is None:
        atomic_write_bytes(run / FACTOR_NAMES, json.dumps(names).encode())
    plan = plan_epochs(cfg.optim.freeze_backbone_epochs, cfg.optim.epochs)
    metrics_log, losses_log, factors_log = (JsonlLog(run / n) for n in ("metrics.jsonl", "losses.jsonl", "factors.jsonl"))
    start, global_step, best = 0, 0, {"mAP": -1.0, "epoch": None}
    if ckpt is not None:
        if ckpt.get("num_classes") != data.num_classes:
            raise RuntimeError(f"{run}: the checkpoint has {ckpt.get('num_classes')} classes, the dataset {data.num_classes}")
        task.load_state_dict(ckpt["task"])
        start, global_step, best = ckpt["next_index"], ckpt["global_step"], ckpt["best"]
        if start < len(plan):
            task.set_backbone_frozen(plan[start].phase == "A")
        optimizer.load_state_dict(ckpt["optimizer"])
        trainer.scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        for jl in (metrics_log, losses_log, factors_log):  # drop what was logged after the checkpoint
            jl.keep(lambda r: r.get("epoch", 0) <= start)
    logger.info(
        "%d regularized tensors, %.1fM parameters, %d classes; %d epochs of %d steps (phase A %d, phase B %d)",
        len(names), sum(p.numel() for p in task.model.parameters()) / 1e6, data.num_classes,
        len(plan), len(loader), cfg.optim.freeze_backbone_epochs, cfg.optim.epochs,
    )
    sched = schedule_from_config(cfg.optim)
    last_metrics: dict = {}
    for ep in plan[start:]:
        frozen = ep.phase == "A"
        if task.model.backbone_frozen != frozen or ep.index == start:
            task.set_backbone_frozen(frozen)
            if not frozen and cfg.optim.tf_adam_step and global_step:
                n = start_at_global_step(optimizer, set(task.parameters()), global_step)
                logger.info("phase B: %d parameters start at Adam step %d", n, global_step)
        lr = learning_rate(ep.epoch, **sched)
        for group in optimizer.param_groups:
            group["lr"] = lr
        task.train()
        meter, t0, images_seen = _LossMeter(), time.perf_counter(), 0
        bar = tqdm(loader, desc=f"epoch {ep.index + 1}/{len(plan)} ({ep.phase})", disable=not cfg.run.progress, leave=False)
        for step, batch in enumerate(bar, 1):
            meter.add(trainer.train_step(batch))
            global_step += 1
            images_seen += batch[0].shape[0]
            if step % cfg.run.log_every == 0 or step == len(loader):
                values = meter.read()
                losses_log.append({"epoch": ep.index + 1, "phase": ep.phase, "step": global_step, "lr": lr, **values})
                bar.set_postfix(loss=f"{values['total']:.3f}")
        elapsed = time.perf_counter() - t0
        factors = task.regularizer.effective_factors().tolist()
        thetas = [float(t) for t in torch.stack(list(task.regularizer.thetas)).tolist()]
        factors_log.append({"epoch": ep.index + 1, "phase": ep.phase, "factors": factors, "theta": thetas})
        logger.info(
            "epoch %d/%d phase %s lr %.2e: loss %.4f, %.0f images/s",
            ep.index + 1, len(plan), ep.phase, lr, values.get("total", float("nan")), images_seen / max(elapsed, 1e-9),
        )
        evaluate_test = (ep.epoch + 1) % cfg.eval.every_epochs == 0 or ep.index == len(plan) - 1
        evaluate_valid = (ep.epoch + 1) % cfg.eval.validation_every_epochs == 0
        wanted = [s for s, on in (("test", evaluate_test), ("valid", evaluate_valid)) if on]
        results = evaluate_splits(task, data.eval_loaders, cfg, trainer.autocast, cfg.run.progress, splits=wanted) if wanted else {}
        for split, (m, _) in results.items():
            record = {"epoch": ep.index + 1, "phase": ep.phase, "split": split, **m}
            metrics_log.append(record)
            logger.info("%s at epoch %d: %s", split, ep.index + 1, format_metrics(m))
            if split == "test":
                last_metrics = record
                if ep.phase == "B" and m["mAP"] > best["mAP"]:
                    best = {"mAP": m["mAP"], "epoch": ep.index + 1}
                    save_checkpoint(run / BEST, _model_state(task, cfg, ep, m, data.dataset.classes))
        is_last = ep.index == len(plan) - 1
        if (ep.index + 1) % cfg.run.checkpoint_every == 0 or is_last:
            save_checkpoint(run / CHECKPOINT, _checkpoint_state(task, optimizer, trainer, loader, cfg, ep.index + 1, global_step, best, names, data.dataset.classes))
        if cfg.run.plots and (results or is_last):
            _plots(run)
    if not (run / BEST).is_file() and plan:  # the seed saves the final model when nothing was selected
        save_checkpoint(run / BEST, _model_state(task, cfg, plan[-1], last_metrics, data.dataset.classes))
    summary = {"run_dir": str(run), "best": best, "last": {k: v for k, v in last_metrics.items() if k != "cmc"}}
    logger.info("done: %s", summary)
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


def evaluate_checkpoint(checkpoint: str | Path, overrides: list[str], *, re_ranking: bool | None = None, out: str | Path | None = None) -> dict:
    """The evaluation-only mode (SPEC B.10.5): load a checkpoint, extract features, evaluate the
    full test set (testing_size 1), and write ``evaluation-<time>.json`` next to the checkpoint."""
    from .config import apply_overrides

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
    data = build_data(cfg, device=device, train=False, progress=cfg.run.progress)
    task = build_task(cfg, int(state["num_classes"])).to(device)
    task.load_state_dict(state["task"])
    trainer = Trainer(task, build_optimizer(task, cfg.optim, torch.device("cpu")), device=device, precision=precision)
    results = evaluate_splits(task, data.eval_loaders, cfg, trainer.autocast, cfg.run.progress, splits=["test"])
    m, (q, g) = results["test"]
    target = Path(checkpoint)
    folder = Path(out) if out else (target if target.is_dir() else target.parent)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"checkpoint": str(checkpoint), "metrics": m, "config": config_to_dict(cfg), "versions": versions()}
    atomic_write_bytes(folder / f"evaluation-{stamp}.json", json.dumps(report, indent=1).encode())
    if cfg.eval.save_features:
        np.savez(folder / f"features-{stamp}.npz", query=q.features.cpu().numpy(), gallery=g.features.cpu().numpy(),
                 query_pids=q.pids, gallery_pids=g.pids, query_camids=q.camids, gallery_camids=g.camids)
    try:
        from .plots import plot_cmc

        plot_cmc(m, folder / f"cmc-{stamp}.png")
    except ImportError:
        pass
    m["report"] = str(folder / f"evaluation-{stamp}.json")
    return m
