"""The ``alr-fast`` command line: a thin layer over ``alr_fast`` functions."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, bundled_config_names, describe_keys, dump_config, load_config

EPILOG_KEYS = """configuration: --config FILE (or a bundled recipe name) sets the defaults, and any number of
section.key=value overrides follow, e.g. optim.epochs=5 data.root=/data run.precision=fp16.
Unknown keys and wrong types are errors that name the key. Keys and their defaults:
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML recipe: a path, or one of the bundled names ({', '.join(bundled_config_names())})",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied after --config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alr-fast",
        description="Person re-identification with Adaptive L2 Regularization (Ni, Fang, Huttunen, ICPR 2020).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'alr-fast COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "train",
        help="train a model (phase A with the backbone frozen, then phase B) and evaluate it",
        description="Train the three-branch model with adaptive L2 on a dataset in its native layout. "
        "The run directory gets the resolved config, logs, metrics.jsonl, checkpoints and plots; "
        "an existing run directory is never overwritten (use --resume to continue it).",
        formatter_class=fmt,
        epilog=EPILOG_KEYS + describe_keys(),
    )
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run directory (default: run.out_dir, else runs/<dataset>_<H>x<W>/<backbone>_<P>_<K>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint, on the same schedule")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="write a torch.profiler trace of N training steps (after 1 skipped and 2 warm-up steps) to "
        "RUN/profile/rank<R>/ (trace.json for chrome://tracing or Perfetto, summary.txt); same as run.profile_steps=N",
    )

    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on the full test set (optionally with re-ranking)",
        description="Evaluation-only mode: load a checkpoint (a run directory takes its best.pt), extract "
        "flip-averaged features of the full query and gallery, and report mAP and CMC. Writes "
        "evaluation-<time>.json and cmc-<time>.png next to the checkpoint.",
        formatter_class=fmt,
        epilog=EPILOG_KEYS + describe_keys(),
    )
    p.add_argument("checkpoint", help="a checkpoint file or a run directory, or one of the seed's Keras training_model.h5")
    p.add_argument("--config", metavar="FILE", help="for a Keras .h5: the recipe it was trained with (e.g. market1501_resnet50_keras)")
    p.add_argument("--re-ranking", action="store_true", help="also report k-reciprocal re-ranked metrics (k1 20, k2 6, lambda 0.3)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: next to the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.root=/data run.device=cpu")

    p = sub.add_parser(
        "export",
        help="export the inference model (flip-averaged features) to ONNX with a dynamic batch",
        description="Write the inference model of a run directory, checkpoint or the seed's training_model.h5 "
        "(with --config) as ONNX: preprocessed images [batch, 3, H, W] -> features [batch, 4096]; the "
        "preprocessing is in the file's metadata. Needs onnx (pip install 'alr-fast[export]').",
    )
    p.add_argument("checkpoint", help="a run directory, a checkpoint file or a Keras training_model.h5")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--config", metavar="FILE", help="for a Keras .h5: the recipe it was trained with")
    p.add_argument("--no-flip", action="store_true", help="export one pass instead of the flip-averaged feature")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.height=256 for a .h5")

    p = sub.add_parser(
        "make-synthetic",
        help="write a synthetic dataset with learnable identities in a native layout",
        description="Write real JPEGs in the Market-1501, DukeMTMC-reID or MSMT17_V2 layout, deterministic "
        "from --seed: identities differ in clothing colours and patterns; cameras differ in "
        "illumination, blur, scale and background. Refuses to write into an existing dataset folder.",
    )
    p.add_argument("--layout", choices=("market1501", "dukemtmc_reid", "msmt17"), default="market1501")
    p.add_argument("--out", default="data", metavar="DIR", help="dataset root to create the layout folder in (default: data)")
    p.add_argument("--train-ids", type=int, default=None, help="training identities")
    p.add_argument("--test-ids", type=int, default=None, help="test identities")
    p.add_argument("--cameras", type=int, default=None, help="number of cameras")
    p.add_argument("--images-per-camera", type=int, default=None, help="images per identity and camera")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "quickstart",
        help="make synthetic data, train on it and evaluate: the whole method in a few CPU minutes",
        description="Runs make-synthetic (Market-1501 layout), train --config quickstart and evaluate, "
        "then prints mAP, rank-1 and where the plots are.",
    )
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="run directory (must not exist yet)")
    p.add_argument("--data", default="data/quickstart", metavar="DIR", help="where the synthetic dataset goes (reused if present)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra config overrides")

    sub.add_parser("configs", help="list the bundled recipes")

    p = sub.add_parser(
        "bench",
        help="benchmarks: train (training step), pipeline (data loaders), kernels (evaluation kernels), "
        "eval (one whole evaluation), recipe (the seed's schedule projected), capture (CUDA-graph capture "
        "check of the step)",
        description="Run a benchmark; 'alr-fast bench WHICH --help' lists its options. Results go to "
        "bench/results/ as JSON (device and versions included) with a plot.",
    )
    p.add_argument("which", choices=tuple(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
    return parser


# benchmark name -> module under alr_fast.bench with a main(argv) -> int
BENCHMARKS = {"train": "train", "pipeline": "pipeline", "kernels": "kernels", "eval": "eval", "recipe": "recipe",
              "capture": "capture"}


def _bench(which: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"alr_fast.bench.{BENCHMARKS[which]}").main(argv)


def _make_synthetic(args) -> Path:
    from .synthetic import make_synthetic, synthetic_summary

    kwargs = {
        k: v
        for k, v in dict(
            num_train_ids=args.train_ids,
            num_test_ids=args.test_ids,
            num_cameras=args.cameras,
            images_per_camera=args.images_per_camera,
        ).items()
        if v is not None
    }
    path = make_synthetic(args.out, args.layout, seed=args.seed, progress=True, **kwargs)
    print(synthetic_summary(path))
    return path


def _train(args) -> dict:
    from .trainer import config_for_resume, fit

    if args.resume:
        cfg = config_for_resume(args.resume, args.overrides)
        if args.print_config:
            print(dump_config(cfg))
            return {}
        return fit(cfg, args.resume, resume=True)
    cfg = load_config(args.config, args.overrides + ([f"run.profile_steps={args.profile}"] if args.profile else []))
    if args.print_config:
        print(dump_config(cfg))
        return {}
    out = args.out or cfg.run.out_dir or cfg.default_out_dir
    return fit(cfg, out)


def _quickstart(args) -> None:
    from .synthetic import make_synthetic
    from .trainer import evaluate_checkpoint, fit

    data_root = Path(args.data)
    if not (data_root / "Market-1501-v15.09.15").is_dir():
        make_synthetic(data_root, "market1501", seed=0, progress=True)
    cfg = load_config("quickstart", [f"data.root={data_root}", *args.overrides])
    summary = fit(cfg, args.out)
    result = evaluate_checkpoint(Path(args.out) / "best.pt", [])
    print()
    print(f"quickstart finished: run directory {summary['run_dir']}")
    print(f"  full test set: mAP {result['mAP']:.4f}, rank-1 {result['rank1']:.4f} (evaluation report {result['report']})")
    print(f"  plots: {Path(summary['run_dir']) / 'plots'} (losses.png, metrics.png, cmc.png, factors.png)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHMARKS:  # options belong to the benchmark
        return _bench(argv[1], argv[2:])
    # overrides may stand before or after options (argparse alone would stop at the first option)
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if r.startswith("-") or "=" not in r]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"'{args.command}' takes no section.key=value overrides: {' '.join(rest)}")
    try:
        if args.command == "train":
            summary = _train(args)
            if summary:
                print(json.dumps(summary, indent=1))
        elif args.command == "evaluate":
            from .evaluation import format_metrics
            from .trainer import evaluate_checkpoint

            result = evaluate_checkpoint(args.checkpoint, args.overrides, re_ranking=args.re_ranking or None, out=args.out,
                                         config=args.config)
            print(format_metrics(result))
            print(f"report: {result['report']}")
        elif args.command == "export":
            from .export import export_checkpoint

            path = export_checkpoint(args.checkpoint, args.out, config=args.config, overrides=args.overrides,
                                     flip=not args.no_flip)
            print(f"wrote {path}")
        elif args.command == "make-synthetic":
            _make_synthetic(args)
        elif args.command == "quickstart":
            _quickstart(args)
        elif args.command == "configs":
            print("\n".join(bundled_config_names()))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"alr-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except compile_errors() as exc:
        import traceback

        traceback.print_exc()
        print(
            f"alr-fast {args.command}: error: torch.compile failed ({type(exc).__name__}). Train eagerly with "
            f"run.compile=none (a run that has a checkpoint continues with --resume RUN run.compile=none).",
            file=sys.stderr,
        )
        return 4
    except torch_oom() as exc:
        print(
            f"alr-fast {args.command}: error: the GPU ran out of memory ({exc}). Nothing was lost: the run "
            f"directory keeps its last checkpoint. Lower data.identities_per_batch or eval.batch_size, use "
            f"run.precision=bf16, or resume with --resume once memory is free.",
            file=sys.stderr,
        )
        return 3
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input: printed as one line, without a traceback."""
    from .datasets import DatasetError
    from .model import PretrainedWeightsError
    from .pipelines.jpeg_store import CorruptImageError
    from .runs import RunDirError

    return (ConfigError, DatasetError, CorruptImageError, RunDirError, PretrainedWeightsError, OSError, ImportError)


def compile_errors() -> type[BaseException]:
    """torch.compile's failures (dynamo, inductor, CUDA-graph capture) share one base class."""
    from torch._dynamo.exc import TorchDynamoException

    return TorchDynamoException


def torch_oom() -> type[BaseException]:
    import torch

    return torch.cuda.OutOfMemoryError


if __name__ == "__main__":
    sys.exit(main())
