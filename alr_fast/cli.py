"""The ``alr-fast`` command line: a thin layer over ``alr_fast`` functions."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, bundled_config_names, describe_keys, dump_config, load_config

EPILOG_KEYS = """configuration: --config FILE (or a bundled recipe name) sets the defaults, and any number of
section.key=value overrides follow, e.g. optim.epochs=5 data.root=/data run.precision=fp16.
Unknown keys and wrong types are errors that name the key. Keys and their defaults:
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EPILOG_EVAL = """configuration: an alr-fast checkpoint carries the config it was trained with; section.key=value
overrides may change where and how it is evaluated (data.root, run.device, eval.*, ...), not the model
(model.*), nor the input size (data.height, data.width) without --allow-input-change. --config FILE
gives the config of a model file that carries none. Keys and their defaults:
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML recipe: a path, or one of the bundled names ({', '.join(bundled_config_names())})",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied after --config")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        epilog=EPILOG_EVAL + describe_keys(),
    )
    p.add_argument("checkpoint", help="a checkpoint file, a run directory (its best.pt, else its checkpoint.pt), or "
                   "one of the seed's Keras training_model.h5 files")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML recipe (a path or a bundled name) for a model file that carries no alr-fast config, e.g. a Keras "
        ".h5 with market1501_resnet50_keras; an alr-fast checkpoint carries its own and refuses this",
    )
    p.add_argument("--re-ranking", action="store_true", help="also report k-reciprocal re-ranked metrics (k1 20, k2 6, lambda 0.3)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: next to the checkpoint)")
    p.add_argument("--allow-input-change", action="store_true",
                   help="accept data.height/data.width overrides that differ from the size the model was trained at")
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
    _add_synthetic_args(p)

    p = sub.add_parser(
        "quickstart",
        help="make synthetic data, train on it and evaluate: the whole method in a few CPU minutes",
        description="Runs make-synthetic (Market-1501 layout), train --config quickstart and evaluate, "
        "then prints mAP, rank-1 and where the plots are. Run again after an interruption, it continues "
        "the run in --out from its last checkpoint.",
    )
    p.add_argument("--out", default="runs/quickstart", metavar="DIR",
                   help="run directory (default: runs/quickstart); an interrupted quickstart there is continued")
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


def _count(name: str, low: int):
    """argparse type: an integer >= ``low`` (the synthetic generator's own minimum)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _add_synthetic_args(p: argparse.ArgumentParser) -> None:
    """make-synthetic's options, with the generator's real defaults and minimums."""
    import inspect

    from .synthetic import ARGUMENT_MINIMUMS, make_synthetic

    defaults = {k: v.default for k, v in inspect.signature(make_synthetic).parameters.items()}
    p.add_argument("--layout", choices=("market1501", "dukemtmc_reid", "msmt17"), default="market1501",
                   help="dataset layout (default: market1501)")
    p.add_argument("--out", default="data", metavar="DIR", help="dataset root to create the layout folder in (default: data)")
    for flag, name, what in (
        ("--train-ids", "num_train_ids", "training identities"),
        ("--test-ids", "num_test_ids", "test identities"),
        ("--cameras", "num_cameras", "number of cameras"),
        ("--images-per-camera", "images_per_camera", "images per identity and camera"),
        ("--distractors", "num_distractors", "gallery-only distractor images"),
    ):
        low = ARGUMENT_MINIMUMS[name]
        p.add_argument(flag, dest=name, type=_count("integer", low), default=defaults[name], metavar="N",
                       help=f"{what} (default: {defaults[name]}; at least {low})")
    p.add_argument("--seed", type=int, default=defaults["seed"], help=f"random seed (default: {defaults['seed']})")


# benchmark name -> module under alr_fast.bench with a main(argv) -> int
BENCHMARKS = {"train": "train", "pipeline": "pipeline", "kernels": "kernels", "eval": "eval", "recipe": "recipe",
              "capture": "capture"}


def _bench(which: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"alr_fast.bench.{BENCHMARKS[which]}").main(argv)


def _make_synthetic(args) -> Path:
    from .synthetic import make_synthetic, synthetic_summary

    kwargs = dict(num_train_ids=args.num_train_ids, num_test_ids=args.num_test_ids, num_cameras=args.num_cameras,
                  images_per_camera=args.images_per_camera, num_distractors=args.num_distractors)
    try:
        path = make_synthetic(args.out, args.layout, seed=args.seed, progress=True, **kwargs)
    except ValueError as exc:  # a combination of counts the layout's file names cannot hold
        raise ConfigError(str(exc)) from None
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


def _quickstart_resumable(out: Path, cfg) -> bool:
    """Whether ``out`` holds an interrupted quickstart to continue; raises RunDirError when it holds
    a finished one or another run."""
    from .config import config_from_dict
    from .runs import CHECKPOINT, RunDirError, read_checkpoint_config
    from .trainer import resume_differences, training_finished

    if not (out / CHECKPOINT).is_file():
        return False
    differ = resume_differences(config_from_dict(read_checkpoint_config(out / CHECKPOINT)), cfg)
    if differ:
        raise RunDirError(f"{out} holds a run that is not this quickstart (it differs in {', '.join(differ[:4])}); "
                          f"nothing was changed in it. Pass --out DIR for a new quickstart")
    if training_finished(out):
        raise RunDirError(f"{out} already holds a finished quickstart; nothing was changed in it. See its results "
                          f"with: alr-fast evaluate {out}, or pass --out DIR for a new quickstart")
    return True


def _quickstart(args) -> None:
    import shlex

    from .config import parse_override
    from .synthetic import make_synthetic
    from .trainer import RESUMABLE_OVERRIDES, config_for_resume, evaluate_checkpoint, fit

    data_root, out = Path(args.data), Path(args.out)
    if not (data_root / "Market-1501-v15.09.15").is_dir():
        make_synthetic(data_root, "market1501", seed=0, progress=True)
    overrides = [f"data.root={data_root}", *args.overrides]
    cfg = load_config("quickstart", overrides)
    again = shlex.join(["alr-fast", "quickstart", "--out", str(out), "--data", str(data_root), *args.overrides])
    if _quickstart_resumable(out, cfg):  # its config equals cfg but for keys a resume may change
        print(f"quickstart: continuing the interrupted run in {out} from its last checkpoint", file=sys.stderr)
        resumable = [o for o in overrides if parse_override(o)[0] in RESUMABLE_OVERRIDES]
        summary = fit(config_for_resume(out, resumable), out, resume=True, resume_command=again)
    else:
        summary = fit(cfg, out, resume_command=again, advice="Pass --out DIR for a new quickstart run.")
    result = evaluate_checkpoint(out / "best.pt", [])
    print()
    print(f"quickstart finished: run directory {summary['run_dir']}")
    print(f"  full test set: mAP {result['mAP']:.4f}, rank-1 {result['rank1']:.4f} (evaluation report {result['report']})")
    print(f"  plots: {Path(summary['run_dir']) / 'plots'} (losses.png, metrics.png, cmc.png, factors.png)")


def _evaluate(args) -> None:
    from .evaluation import format_metrics
    from .trainer import evaluate_checkpoint

    config = load_config(args.config, args.overrides) if args.config else None
    result = evaluate_checkpoint(args.checkpoint, args.overrides, re_ranking=args.re_ranking or None, out=args.out,
                                 config=config, allow_input_change=args.allow_input_change)
    print(f"evaluated {result['evaluated']}")
    print(format_metrics(result))
    print(f"report: {result['report']}")


def _is_rank0() -> bool:
    """Under torchrun only rank 0 reports (the other ranks' summaries hold no metrics)."""
    return int(os.environ.get("RANK", "0")) == 0


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
    from .guards import EXIT_DIVERGED, DivergenceError, RunStopped, Terminated

    try:
        if args.command == "train":
            summary = _train(args)
            if summary and _is_rank0():
                print(json.dumps(summary, indent=1))
        elif args.command == "evaluate":
            _evaluate(args)
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
    except RunStopped as exc:
        print(f"alr-fast {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:  # outside training: nothing to resume
        print(f"alr-fast {args.command}: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except DivergenceError as exc:
        print(f"alr-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except _user_errors() as exc:
        print(f"alr-fast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
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


def _one_line(exc: BaseException) -> str:
    """The error on one line, as the CLI promises (multi-line messages are joined)."""
    text = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split()) or type(exc).__name__


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
