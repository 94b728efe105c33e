"""The whole recipe's time (``alr-fast bench recipe``): the seed's schedule projected from measurements.

On synthetic data at a dataset's real counts (times ``--scale``) and with the real configuration
(``--config``, default the Market-1501 ResNet-50 recipe; ``section.key=value`` overrides follow),
it measures, through the trainer's own pieces (``build_data``, ``Trainer.train_step``,
``evaluate_splits``, ``save_checkpoint``):

  setup        reading and verifying the JPEGs, the decode-once training and evaluation caches
  phase A      training steps with the backbone frozen (after ``--warmup`` untimed steps, where
               compilation and CUDA-graph capture happen: reported as a one-time cost)
  phase B      training steps with everything trainable (again after a warm-up)
  evaluation   one full test evaluation (extraction + kernels, re-ranking if the config asks)
  checkpoint   one checkpoint write (model + optimizer state)

and projects the schedule of the config (seed: 20 + 200 epochs of 200 steps, a test evaluation
every 10 epochs of each phase and at the end: 22, a checkpoint every epoch) as one wall-clock
figure with its parts. Timed steps run back to back with one synchronisation at the end, as
training runs; ``--max-seconds`` bounds the timed steps of each phase (fewer steps, the same
projection). Without a GPU it picks CPU-sized work (ResNet-18 at 128x64, 1% of the counts, a
few steps) and says so. Writes ``recipe-<device>-<date>.json`` and a PNG into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from alr_fast.bench.common import (
    add_out_argument, environment, result_path, stacked_bar_plot, synchronize, write_result,
)
from alr_fast.bench.synthetic_fast import scaled_counts, write_dataset

CPU_OVERRIDES = ["model.backbone=resnet18", "data.height=128", "data.width=64"]
TARGET_S = {("market1501", "resnet50"): 15 * 60.0}  # issue 10: the full Market-1501 ResNet-50 recipe on one H200


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alr-fast bench recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="market1501_resnet50", help="bundled recipe name or YAML path")
    p.add_argument("--scale", type=float, default=None, help="fraction of the real counts (default: 1 on a GPU, "
                   "0.01 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 50 on a GPU, 2 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per phase (default: 10 on a GPU, 1 on a CPU)")
    p.add_argument("--max-seconds", type=float, default=None, help="bound of the timed steps of each phase")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (run.device)")
    add_out_argument(p)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. run.compile=none")
    return p


def _say(text: str) -> None:
    print(f"bench recipe: {text}", file=sys.stderr, flush=True)


def evaluations_in_schedule(freeze_epochs: int, epochs: int, every: int) -> int:
    """Test evaluations of the trainer's schedule: every ``every`` epochs within each phase, and at
    the last epoch (the rule of ``trainer._evaluate_epoch``)."""
    from alr_fast.trainer import plan_epochs

    plan = plan_epochs(freeze_epochs, epochs)
    return sum((ep.epoch + 1) % every == 0 or ep.index == len(plan) - 1 for ep in plan)


def _time_phase(trainer, batches, device, steps: int, warmup: int, max_seconds: float | None) -> dict:
    """Warm-up steps (compilation, capture), then timed steps back to back; seconds per step."""
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(next(batches))
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.train_step(next(batches))  # one step, to size the rest within max_seconds
    synchronize(device)
    first = time.perf_counter() - start
    if max_seconds is not None:
        steps = max(1, min(steps, int(max_seconds / max(first, 1e-6))))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    synchronize(device)
    total = time.perf_counter() - start
    return {"warmup_steps": warmup, "warmup_s": warmup_s, "timed_steps": steps, "step_s": total / steps}


def run(args) -> dict:
    from alr_fast.bench.train import loader_steps
    from alr_fast.config import load_config
    from alr_fast.data import build_data
    from alr_fast.runs import save_checkpoint
    from alr_fast.task import build_task
    from alr_fast.trainer import (
        Trainer, build_optimizer, evaluate_splits, input_dtype, resolve_compile, resolve_device, resolve_precision,
    )

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    cpu_notes = []
    if args.scale is None:
        args.scale = 1.0 if on_gpu else 0.01
        cpu_notes += [] if on_gpu else ["scale=0.01"]
    if args.steps is None:
        args.steps = 50 if on_gpu else 2
        cpu_notes += [] if on_gpu else ["steps=2"]
    if args.warmup is None:
        args.warmup = 10 if on_gpu else 1
    user_keys = {o.split("=", 1)[0] for o in args.overrides}
    extra = [] if on_gpu else [o for o in CPU_OVERRIDES if o.split("=", 1)[0] not in user_keys]
    if not on_gpu:
        _say(f"no GPU: CPU-sized work ({', '.join(cpu_notes + extra)}); on a GPU the real configuration runs")
    with tempfile.TemporaryDirectory() as tmp:
        forced = [f"data.root={tmp}", "model.pretrained=none", "run.progress=false", "run.plots=false",
                  f"run.device={args.device}", "data.testing_size=1.0", "data.validation_size=0.0"]
        cfg = load_config(args.config, [*extra, *args.overrides, *forced])
        counts = scaled_counts(cfg.data.dataset, args.scale)
        _say(f"synthetic {cfg.data.dataset} at {args.scale:g} x the real counts: {counts} ...")
        start = time.perf_counter()
        write_dataset(tmp, cfg.data.dataset, counts)
        generation_s = time.perf_counter() - start
        precision = resolve_precision(cfg.run.precision, device)
        channels_last = cfg.run.channels_last and on_gpu
        _say("setup: read + verify the JPEGs, training and evaluation caches ...")
        start = time.perf_counter()
        data = build_data(cfg, device=device, dtype=input_dtype(precision, device), channels_last=channels_last,
                          progress=False)
        synchronize(device)
        setup_s = time.perf_counter() - start
        torch.manual_seed(cfg.run.seed)
        task = build_task(cfg, data.num_classes).to(device)
        if channels_last:
            task.model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(task, cfg.optim, device)
        trainer = Trainer(task, optimizer, device=device, precision=precision, compile_mode=cfg.run.compile)
        batches = loader_steps(data.train_loader)
        task.train()
        phases = {}
        for name, frozen in (("A", True), ("B", False)):
            _say(f"phase {name}: {args.warmup} warm-up + {args.steps} timed steps ...")
            trainer.set_backbone_frozen(frozen)
            task.train()
            phases[name] = _time_phase(trainer, batches, device, args.steps, args.warmup, args.max_seconds)
        _say("one full test evaluation ...")
        stage_times: dict = {}
        start = time.perf_counter()
        metrics = evaluate_splits(task, data.eval_loaders, cfg, progress=False, splits=["test"],
                                  stage_times=stage_times)["test"][0]
        synchronize(device)
        evaluation_s = time.perf_counter() - start
        state = {"task": task.state_dict(), "optimizer": optimizer.state_dict()}
        start = time.perf_counter()
        save_checkpoint(Path(tmp) / "checkpoint.pt", state)
        checkpoint_s = time.perf_counter() - start

    o = cfg.optim
    steps_per_epoch = cfg.data.steps_per_epoch
    num_evals = evaluations_in_schedule(o.freeze_backbone_epochs, o.epochs, cfg.eval.every_epochs)
    epochs = o.freeze_backbone_epochs + o.epochs
    num_checkpoints = -(-epochs // cfg.run.checkpoint_every)
    parts = {
        "setup_s": setup_s,
        "warmup_and_compile_s": phases["A"]["warmup_s"] + phases["B"]["warmup_s"],
        "phase_A_s": o.freeze_backbone_epochs * steps_per_epoch * phases["A"]["step_s"],
        "phase_B_s": o.epochs * steps_per_epoch * phases["B"]["step_s"],
        "evaluations_s": num_evals * evaluation_s,
        "checkpoints_s": num_checkpoints * checkpoint_s,
    }
    total = sum(parts.values())
    result = {
        "kind": "recipe", "environment": environment(device), "args": vars(args), "cpu_sized": not on_gpu,
        "config": {"name": args.config, "dataset": cfg.data.dataset, "backbone": cfg.model.backbone,
                   "height": cfg.data.height, "width": cfg.data.width, "batch": cfg.data.identities_per_batch *
                   cfg.data.images_per_identity, "precision": precision,
                   "compile": resolve_compile(cfg.run.compile, device), "re_ranking": cfg.eval.re_ranking,
                   "overrides": [*extra, *args.overrides]},
        "dataset": {**counts, "generation_s": generation_s, "train_loader": type(data.train_loader).__name__,
                    "eval_loader": type(data.eval_loaders["test"][0]).__name__},
        "measured": {"phase_A": phases["A"], "phase_B": phases["B"], "evaluation_s": evaluation_s,
                     "evaluation_stages_s": stage_times, "evaluation_mAP": metrics["mAP"], "checkpoint_s": checkpoint_s},
        "schedule": {"phase_A_epochs": o.freeze_backbone_epochs, "phase_B_epochs": o.epochs,
                     "steps_per_epoch": steps_per_epoch, "evaluations": num_evals, "checkpoints": num_checkpoints},
        "projection": {**parts, "total_s": total, "total_min": total / 60.0,
                       "images_per_s_phase_B": cfg.data.identities_per_batch * cfg.data.images_per_identity
                       / phases["B"]["step_s"]},
    }
    target = TARGET_S.get((cfg.data.dataset, cfg.model.backbone))
    if on_gpu and args.scale == 1.0 and target:
        result["target"] = {"total_s": target, "met": total < target}
    _say(f"projected {epochs} epochs + {num_evals} evaluations: {total / 60:.1f} min "
         f"({', '.join(f'{k[:-2]} {v:.0f} s' for k, v in parts.items())})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = run(args)
    env = result["environment"]
    path = write_result(result_path(Path(args.out), "recipe", env), result)
    if not args.no_plot:
        parts = {k: v for k, v in result["projection"].items() if k.endswith("_s") and k != "total_s"}
        c = result["config"]
        stacked_bar_plot(path.with_suffix(".png"), ["projected recipe"], [k[:-2] for k in parts],
                         [[v / 60.0 for v in parts.values()]], "minutes",
                         f"{c['dataset']} {c['backbone']} {c['height']}x{c['width']}, {result['schedule']['phase_A_epochs']}"
                         f"+{result['schedule']['phase_B_epochs']} epochs on {env['device_name']}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
