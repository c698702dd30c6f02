"""The ``layerexit`` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from layerexit.config import TrainConfig, add_arguments, from_namespace, objective_help
from layerexit.errors import LayerExitError
from layerexit.sweep import FAMILIES


def _families(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {unknown[0] if unknown else text!r}; known: {', '.join(FAMILIES)}"
        )
    return names


def cmd_train(args: argparse.Namespace) -> int:
    from layerexit.train import train

    config = from_namespace(TrainConfig, args)
    run_dir = train(config, progress=not args.quiet)
    print(f"run folder: {run_dir}")
    if args.evaluate:
        return _evaluate(run_dir, ["dev", "test"], list(FAMILIES), config.eval_batch_size, not args.quiet)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    return _evaluate(
        Path(args.run), args.splits, args.strategies, args.batch_size, not args.quiet, reuse=not args.fresh
    )


def _evaluate(
    run: Path, splits: Sequence[str], families: Sequence[str], batch_size: int, progress: bool, reuse: bool = True
) -> int:
    from layerexit.evaluate import EVAL_DIR, evaluate_run, format_report

    report = evaluate_run(run, splits=splits, families=families, batch_size=batch_size, progress=progress, reuse=reuse)
    print(format_report(report))
    out = run / EVAL_DIR
    print(f"\nwrote {out}/report.json, points.csv, exit_layers.csv, tradeoff.png")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from layerexit.data import builtin_tasks

    for name, description in builtin_tasks().items():
        print(f"{name:<16} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerexit",
        description="Early exiting for pretrained transformer classifiers (Sun et al., ensemble internal classifiers).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    train = command("train", cmd_train, "Train an early-exit model. Objectives: " + objective_help())
    add_arguments(train, TrainConfig)
    train.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate on dev and test after training",
    )

    evaluate = command("evaluate", cmd_evaluate, "Replay every exit strategy over a run's dev and test splits")
    evaluate.add_argument("run", help="run folder written by `layerexit train`")
    evaluate.add_argument("--splits", nargs="+", default=["dev", "test"], help="splits to evaluate")
    evaluate.add_argument(
        "--strategies",
        type=_families,
        default=list(FAMILIES),
        help="comma-separated strategy families: " + ",".join(FAMILIES),
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    evaluate.add_argument("--fresh", action="store_true", help="recompute stored probabilities instead of reusing them")

    command("tasks", cmd_tasks, "List the built-in tasks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LayerExitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
