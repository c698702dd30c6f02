"""The ``layerexit`` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from layerexit.cli_options import (
    AnalyzeOptions,
    BenchOptions,
    CalibrateOptions,
    CompareCommand,
    EvaluateOptions,
    ExportOptions,
    PredictOptions,
    RetrofitCommand,
    TrainCommand,
)
from layerexit.config import TrainConfig, add_arguments, from_namespace, given_options, objective_help
from layerexit.errors import LayerExitError
from layerexit.evaluation.sweep import FAMILIES
from layerexit.runtime.registry import REFERENCE, prepare_process

if TYPE_CHECKING:
    from layerexit.run_folder import RunFolder


def cmd_train(args: argparse.Namespace) -> int:
    from layerexit.training.distributed import is_main_process, launch
    from layerexit.training.loop import train

    config = from_namespace(TrainConfig, args)
    command = from_namespace(TrainCommand, args)
    if command.resume:
        from layerexit.training.checkpoint import resume_config

        run = Path(config.output or Path("runs") / config.run_name())
        config = resume_config(run, config, given_options(TrainConfig, args.argv))
    if command.num_processes > 1:  # process 0 of the launch prints the run folder
        code = launch(command.num_processes, [*args.argv, "--num-processes", "1", "--no-evaluate"])
        run_dir = Path(config.output or Path("runs") / config.run_name())
    else:
        first = Path(command.first_stage_from) if command.first_stage_from else None
        run_dir = train(config, progress=not args.quiet, resume=command.resume, first_stage_from=first)
        if not is_main_process():
            return 0
        print(f"run folder: {run_dir}")
        code = 0
    if code == 0 and command.evaluate:
        return _evaluate(run_dir, ["dev", "test"], list(FAMILIES), config.eval_batch_size, not args.quiet)
    return code


def cmd_retrofit(args: argparse.Namespace) -> int:
    from layerexit.training.retrofit import RetrofitConfig, retrofit

    config = from_namespace(RetrofitConfig, args)
    run_dir = retrofit(config, progress=not args.quiet)
    print(f"run folder: {run_dir}")
    if not from_namespace(RetrofitCommand, args).evaluate:
        return 0
    return _evaluate(run_dir, ["dev", "test"], list(FAMILIES), config.eval_batch_size, not args.quiet)


def cmd_evaluate(args: argparse.Namespace) -> int:
    o = from_namespace(EvaluateOptions, args)
    return _evaluate(
        Path(o.run),
        o.splits,
        o.strategies,
        o.batch_size,
        not args.quiet,
        reuse=not o.fresh,
        runtime=o.runtime,
        reference=o.reference or None,
    )


def _evaluate(
    run: Path,
    splits: Sequence[str],
    families: Sequence[str],
    batch_size: int,
    progress: bool,
    reuse: bool = True,
    runtime: str = "torch",
    reference: str | None = None,
) -> int:
    from layerexit.evaluation.evaluate import evaluate_run, format_report
    from layerexit.run_folder import RunFolder

    folder = RunFolder(run)
    report = evaluate_run(
        folder,
        splits=splits,
        families=families,
        batch_size=batch_size,
        progress=progress,
        reuse=reuse,
        runtime=runtime,
        reference=reference,
    )
    print(format_report(report))
    if runtime != REFERENCE and folder.report_file(REFERENCE).is_file():
        torch_report = folder.report(REFERENCE)
        metric, split = report["metric"], report["report_split"]
        before = torch_report["splits"][split]["full_model"][metric]
        after = report["splits"][split]["full_model"][metric]
        print(
            f"\nfull model {metric} on {split}: PyTorch {before:.4f}, {runtime} {after:.4f} "
            f"(change {100 * (after - before):+.2f} points)"
        )
    print(f"\nwrote {folder.eval_dir(runtime)}/report.json, points.csv, exit_layers.csv, tradeoff.png")
    return 0


def _read_inputs(args: PredictOptions) -> tuple[list[str], list[str] | None]:
    """Texts from arguments, a CSV/TSV/JSONL file, or standard input (one text per line)."""
    if args.texts and args.file:
        raise LayerExitError("give texts as arguments or --file, not both")
    if args.texts:
        return list(args.texts), None
    if args.file:
        from layerexit.data import read_inputs

        texts, pairs, skipped = read_inputs(Path(args.file), args.text_column, args.pair_column or None)
        for reason, count in skipped.items():
            print(f"skipped {count} rows of {args.file}: {reason}", file=sys.stderr)
        return texts, pairs
    if sys.stdin.isatty():
        raise LayerExitError("no input: give texts as arguments, --file, or lines on standard input")
    lines = [line.rstrip("\n") for line in sys.stdin]
    return [line for line in lines if line.strip()], None


def cmd_predict(args: argparse.Namespace) -> int:
    from layerexit.data.encoding import pairs_problem
    from layerexit.predictor import Predictor

    o = from_namespace(PredictOptions, args)
    if o.shared_pool:
        prepare_process([o.runtime], o.threads or None)
    predictor = Predictor.from_run(o.run, o.strategy, threads=o.threads or None, runtime=o.runtime)
    texts, pairs = _read_inputs(o)
    problem = pairs_problem(predictor.text_pairs, pairs is not None, field="--file with --pair-column")
    if problem:
        raise LayerExitError(f"{o.run}: {problem}")
    print(f"strategy: {predictor.strategy} ({predictor.strategy_source})", file=sys.stderr)
    for text, prediction in zip(texts, predictor.predict(texts, pairs, batch_size=o.batch_size), strict=True):
        print(json.dumps({"text": text, **prediction.to_dict()}, ensure_ascii=False))
    return 0


def bench_long_inputs(run: RunFolder, model: Any, split: str, tokens: int, samples: int) -> Any:
    """``bench --tokens``: inputs of exactly ``tokens`` tokens from the split's texts, checked against what
    the model can take."""
    from layerexit.evaluation.bench import long_inputs

    if run.text_pairs():
        raise LayerExitError("--tokens joins single texts; this run classifies text pairs")
    positions = getattr(model.backbone.config, "max_position_embeddings", None)
    if tokens < 4 or (positions is not None and tokens > int(positions)):
        raise LayerExitError(f"--tokens must be between 4 and the model's {positions} positions, got {tokens}")
    texts = [e.text for e in run.config().load_task().splits[split]]
    return long_inputs(run.tokenizer(), texts, tokens, samples, model.backbone.uses_token_type_ids)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from layerexit.evaluation.bench import BenchInputs, bench, format_bench
    from layerexit.evaluation.evaluate import load_run_split
    from layerexit.model import EarlyExitModel
    from layerexit.predictor import default_strategy
    from layerexit.run_folder import RunFolder
    from layerexit.runtime import load_runtime
    from layerexit.runtime.torch_runtime import TorchRuntime
    from layerexit.strategies import parse

    o = from_namespace(BenchOptions, args)
    threads = o.threads or torch.get_num_threads()  # pinned for the whole run
    if o.shared_pool:
        prepare_process(o.runtime, threads)
    run = RunFolder(o.run).require(config=True).require_finished()
    model = EarlyExitModel.from_pretrained(run.path)
    strategy = run.bind(parse(o.strategy)) if o.strategy else default_strategy(run)[0]
    loaded = load_run_split(run, o.split, model, limit=0 if o.tokens else o.samples)
    assert loaded is not None
    encoded, pad_id = loaded
    if o.tokens:
        encoded = bench_long_inputs(run, model, o.split, o.tokens, o.samples)
    others = [load_runtime(run, name, threads=threads) for name in dict.fromkeys(o.runtime) if name != REFERENCE]
    results = bench(
        TorchRuntime(model),
        strategy,
        BenchInputs(encoded, pad_id),
        batch_sizes=o.batch_sizes,
        repeats=o.repeats,
        threads=threads,
        progress=not args.quiet,
        others=others,
    )
    results["run"] = str(run)
    results["split"] = o.split
    print(format_bench(results))
    out = run.write_json(Path(o.output) if o.output else run.bench_file, results)
    print(f"\nwrote {out}")
    return 0


def calibration_batches(run: RunFolder, texts: int, batch_size: int = 32) -> list[tuple[Any, Any, Any]]:
    """Token batches of up to ``texts`` of the run's training texts (a seeded sample), for static int8."""
    import random

    from layerexit.data.encoding import collate, encode

    try:
        task = run.config().load_task()
    except LayerExitError as err:
        raise LayerExitError(
            f"static int8 calibrates on the run's training texts; they cannot be read: {err}"
        ) from None
    examples = list(task.splits.get("train") or task.splits.get("dev") or [])
    if not examples:
        raise LayerExitError(f"{run.path}: the run's task has no training texts to calibrate int8 on")
    random.Random(0).shuffle(examples)
    examples = examples[:texts]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    tokenizer = run.tokenizer()
    encoded = encode(tokenizer, [e.text for e in examples], pairs, max_length=run.max_length())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(encoded), batch_size):
        b = collate(encoded, range(start, min(start + batch_size, len(encoded))), pad_id=pad_id)
        batches.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids")))
    return batches


def cmd_export(args: argparse.Namespace) -> int:
    from layerexit.model import EarlyExitModel
    from layerexit.run_folder import RunFolder
    from layerexit.runtime.registry import runtime_entry

    o = from_namespace(ExportOptions, args)
    export = runtime_entry(o.runtime).export
    assert export is not None  # the choices are the runtimes with an export
    run = RunFolder(o.run).require()
    model = EarlyExitModel.from_pretrained(run.path)
    out = Path(o.output) if o.output else run.export_dir(o.runtime)
    export(model, out, o.opset, run.tokenizer(), lambda: calibration_batches(run, o.calibration_texts))
    print(f"wrote {out} (embeddings, {model.num_layers} layer+exit graphs, the full model, onnx_manifest.json)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from layerexit.evaluation import calibrate
    from layerexit.evaluation.agreement import calibration_grid
    from layerexit.evaluation.evaluate import SplitSource, reference_answers
    from layerexit.evaluation.replay import GridReplay
    from layerexit.run_folder import RunFolder

    o = from_namespace(CalibrateOptions, args)
    run = RunFolder(o.run).require(config=True)
    source = SplitSource(run, progress=not args.quiet)
    calib = source.probs(o.calibration_split)
    test = source.probs(o.test_split, required=False)
    assert calib is not None
    probs, labels = calib

    def answers(split: str, split_labels: Any) -> Any:
        return reference_answers(run, o.reference, split, split_labels) if o.reference else None

    families = o.strategies or calibrate.default_families(run.config().objective, risk=o.max_drop is not None)
    reference = answers(o.calibration_split, labels)
    grid, rows, left_out = calibration_grid(
        run, families, o.calibration_split, probs.shape[0], probs.shape[2], len(labels)
    )
    if rows is not None:  # rows that fitted a learned rule: calibrating on them would void the bound
        probs, labels = probs[:, rows], labels[rows]
        reference = None if reference is None else reference[rows]
    replay = GridReplay.of(probs, grid, reference)
    if o.target_speedup is not None:
        choices = calibrate.for_speedup(replay, labels, o.target_speedup, families=families)
    else:
        choices = calibrate.for_risk(replay, labels, o.max_drop, o.confidence, families=families, loss=o.loss)
    checks = []
    if test is not None:
        reference = answers(o.test_split, test[1])
        checks = [calibrate.check_on_test(c, *test, reference=reference) for c in choices]
    default = calibrate.pick_default(choices)
    path = calibrate.save_choice(
        run.path,
        choices,
        default=default,
        checks=checks,
        split={"calibration": o.calibration_split, "test": o.test_split if test else None}
        | ({"left_out": left_out} if left_out else {}),
        reference=o.reference or None,
    )
    print(calibrate_table(choices, checks, o.calibration_split, o.test_split))
    print(f"\ndefault strategy: {default.strategy} (used by `layerexit predict` and Predictor.from_run)")
    print(f"wrote {path}")
    return 0


def calibrate_table(choices: Sequence, checks: Sequence, calib_split: str, test_split: str) -> str:
    risk_mode = choices[0].mode == "risk"
    what = choices[0].loss if risk_mode else (choices[0].metric or "metric")
    width = max([52, *(len(str(c.strategy)) for c in choices)])
    head = f"{'strategy':<9} {'setting':<{width}} {calib_split + ' speed-up':>15} {calib_split + ' ' + what:>22}"
    if checks:
        head += f" {test_split + ' speed-up':>15} {test_split + ' ' + what:>22}"
    lines = [head]
    by_family = {c.family: c for c in checks}
    for c in choices:
        value = (c.risk if risk_mode else c.metric_value) or 0.0
        line = f"{c.family:<9} {c.strategy!s:<{width}} {c.speedup:>14.2f}x {value:>22.4f}"
        check = by_family.get(c.family)
        if check is not None:
            realised = (check.risk if risk_mode else check.metric_value) or 0.0
            line += f" {check.speedup:>14.2f}x {realised:>22.4f}"
        lines.append(line)
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    from layerexit.compare import DEFAULT_METHODS, compare, format_table, parse_method

    o = from_namespace(CompareCommand, args)
    methods = [m.strip() for m in o.methods.split(",") if m.strip()] if o.methods else list(DEFAULT_METHODS)
    for spec in methods:
        parse_method(spec)
    if not o.seeds:
        raise LayerExitError("--seeds needs at least one seed")
    base = from_namespace(TrainConfig, args)
    output = Path(o.output or Path("runs") / f"compare-{base.slug()}")
    finetune_from = Path(o.finetune_from) if o.finetune_from else None
    summary = compare(base, methods, o.seeds, output, progress=not args.quiet, finetune_from=finetune_from)
    print(format_table(summary))
    print(f"\nwrote {output}/compare.md, compare.json, compare.csv, compare.png")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from layerexit.evaluation.analysis import analyze_run

    o = from_namespace(AnalyzeOptions, args)
    for path in analyze_run(Path(o.run), split=o.split):
        print(f"wrote {path}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from layerexit.data import builtin_tasks

    for name, description in builtin_tasks().items():
        print(f"{name:<16} {description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes, like every other error, are one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


LIMITS = {
    "batch_size": 1,
    "batch_sizes": 1,
    "samples": 1,
    "repeats": 1,
    "threads": 0,
    "num_processes": 1,
    "seeds": 0,
}
"""Lowest allowed value of integer options of the commands (TrainConfig and EngineConfig check their own
fields)."""


def _check_limits(args: argparse.Namespace) -> None:
    for name, low in LIMITS.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v < low:
                raise LayerExitError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    add_arguments(train, TrainCommand)

    from layerexit.training.retrofit import RetrofitConfig

    retro = command("retrofit", cmd_retrofit, "Add exits to a fine-tuned classifier, keeping its head and its answers")
    retro.add_argument("classifier", help=RetrofitConfig.__dataclass_fields__["classifier"].metadata["help"])
    add_arguments(retro, RetrofitConfig, skip=("classifier",))
    add_arguments(retro, RetrofitCommand)

    evaluate = command("evaluate", cmd_evaluate, "Replay every exit strategy over a run's dev and test splits")
    add_arguments(evaluate, EvaluateOptions)
    predict = command(
        "predict", cmd_predict, "Early-exit predictions as JSON lines (label, probability, exit layer, time)"
    )
    add_arguments(predict, PredictOptions)
    bench_cmd = command("bench", cmd_bench, "Measure early exit against the full model on the clock, in one run")
    add_arguments(bench_cmd, BenchOptions)
    export = command(
        "export",
        cmd_export,
        "Export a run as ONNX graphs (embeddings, each layer fused with its exit, the full model) for ONNX Runtime",
    )
    add_arguments(export, ExportOptions)
    cal = command(
        "calibrate",
        cmd_calibrate,
        "Choose each strategy's setting for a target speed-up, or for a bounded accuracy drop with a "
        "stated confidence (Learn-then-Test); saves the choice in the run folder",
    )
    add_arguments(cal, CalibrateOptions)
    cmp = command(
        "compare",
        cmd_compare,
        "Train several methods (same budget and seeds), evaluate every (method, strategy) pair, "
        "and write one table and one plot; finished runs are reused",
    )
    add_arguments(cmp, TrainConfig, skip=("objective", "static_layers", "seed", "output"))
    add_arguments(cmp, CompareCommand)
    analyze = command(
        "analyze",
        cmd_analyze,
        "The paper's analysis figures for a run: exit-layer distribution per strategy (Fig. 8), "
        "closest earlier exit during training (Fig. 6b), voting values V_l (Fig. 7)",
    )
    add_arguments(analyze, AnalyzeOptions)

    from layerexit.serving.server import add_parsers as add_serving

    add_serving(command)
    from layerexit.evaluation.agreement import add_command as add_agreement_command

    add_agreement_command(command)
    command("tasks", cmd_tasks, "List the built-in tasks")

    from layerexit.report import add_command as add_report_command

    add_report_command(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "predict" and not any(e.startswith("-") for e in extras):
        args.texts = [*args.texts, *extras]  # texts written after the options: argparse leaves them over
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_limits(args)
        return int(args.func(args))
    except LayerExitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:  # disk full, permissions, read-only filesystem, ...: the files written before are whole
        if os.environ.get("LAYEREXIT_DEBUG"):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
