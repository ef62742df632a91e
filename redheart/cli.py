"""The command line: one table, command -> (handler, help, arguments); argument parsing only.

    redheart unified-test | unified-train | unified-test-v1 | train-local | validate
    redheart info | predict | evaluate | crossover | plot

A handler checks what its arguments name (files, values) and hands over to the module that does
the work; heavy modules are imported only then, so that a bad flag fails at once. Exit codes:
`redheart.exitcodes`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redheart import exitcodes, flags, launch
from redheart.config import PRESETS, build_config
from redheart.overrides import ConfigError

log = logging.getLogger("redheart")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: `error: ...` naming the argument, exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(exitcodes.USAGE)

    def parse_known_args(self, args=None, namespace=None):
        # Python 3.11's argparse reads `--flag=--` as an empty list for a one-value flag (a
        # TypeError far from the command line): refuse it here, naming the flag
        parsed, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if type(action) is argparse._StoreAction and action.nargs is None and isinstance(value, list):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one value, got none")
        return parsed, rest


# ---------------------------------------------------------------------------------------
# Handlers: parsed arguments -> exit code


def train_command(args) -> int:
    """unified-test, unified-train, train-local: one run (under torchrun for --gpus/--nnodes)."""
    mode = args.command
    if launch.wanted(args):
        _, chosen = flags.checked_config(args, mode)  # a bad value: one error, no launch
        # the preset chosen without a GPU is said once, here, and passed on to the ranks
        argv = sys.argv[1:] if args.argv is None else args.argv
        return launch.launch_distributed(args, argv if args.preset else [*argv, "--preset", chosen])
    cfg, _ = flags.checked_config(args, mode)
    from redheart import faults

    injected = faults.from_env()
    from redheart.data.importers import load_data

    # every data file read and checked now: a bad one fails at once, before the heavy imports
    # and before the run's folder is made
    data = load_data(cfg.data.paths, cfg.data.skip_bad_records)
    from redheart.resume_flags import asked_settings
    from redheart.run import RunOptions, train

    asked = asked_settings(args, mode, flags.parse_samples(args))
    opts = RunOptions(resume=args.resume, restart=args.restart, epochs_given="train.epochs" in asked,
                      debug=args.debug, verbose=args.verbose, analysis=mode != "train-local",
                      faults=injected, mode=mode, data=data, asked=asked)
    return train(cfg, opts)


def unified_test_v1(args) -> int:
    """The quick test on each legacy preset in turn, each in its own folder; the first failure ends it."""
    from redheart.run import RunOptions, train

    worst = 0
    for name in flags.choose_presets(args, "unified-test-v1"):
        cfg = flags.make_config(args, "unified-test-v1", name)
        if flags.bounded_on_cpu(cfg, args):
            print(f"[redheart] no GPU found: {name} runs a bounded check on CPU "
                  f"({cfg.data.max_records} records, {cfg.train.epochs} epochs, no LR sweep)", file=sys.stderr)
        cfg.output_dir = os.path.join(args.output_dir, name)
        opts = RunOptions(resume=args.resume, restart=True if args.resume is None else args.restart,
                          debug=args.debug, verbose=args.verbose, mode="unified-test-v1")
        code = train(cfg, opts)
        worst = max(worst, code)
        if code:
            break
    return worst


def validate(args) -> int:
    from redheart.validate import run_checks

    (chosen,) = flags.choose_presets(args, "validate", announce=False)
    return run_checks(flags.make_config(args, "validate", chosen), mode=args.target)


def info(args) -> int:
    from redheart.model.modules import preset_parameter_counts
    from redheart.train.memory import estimate

    cfg = build_config(args.preset, args.config, args.set)
    counts = preset_parameter_counts(cfg)
    out: dict[str, Any] = {"preset": args.preset, "trainable_parameters": counts}
    if args.memory:
        out["memory_estimate_gib"] = estimate(cfg, counts["total"])
    print(json.dumps(out, indent=2))
    return exitcodes.OK


def predict(args) -> int:
    if args.file and not os.path.isfile(args.file):
        raise ConfigError(f"--file {args.file}: no such file")
    if not os.path.isfile(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    from redheart.predict import predict_command

    return predict_command(args)


def evaluate(args) -> int:
    if not os.path.isfile(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1 (got {args.batch_size})")
    if args.device != "auto":
        flags.check_device(args.device)
    from redheart.evaluate import evaluate_command

    return evaluate_command(args)


def crossover(args) -> int:
    from redheart.analysis import crossover_command

    return crossover_command(args)


def plot(args) -> int:
    from redheart.plots import plot_command

    return plot_command(args)


# ---------------------------------------------------------------------------------------
# Arguments of each command


def training_arguments(samples_help: str) -> Callable[[argparse.ArgumentParser], None]:
    return lambda p: flags.add_arguments(p, samples_help)


def validate_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_arguments(p, "unused")
    p.add_argument("--target", default="unified-train", choices=["unified-test", "unified-train"],
                   help="which mode's needs to check (disk space, preset)")


def info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="730m")
    p.add_argument("--memory", action="store_true", help="add the training-memory estimate")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--set", action="append", default=[])


def predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint, snapshot or crossover_final.pth")
    p.add_argument("texts", nargs="*", help="texts; none = read one text per line from --file or stdin")
    p.add_argument("--file", help="a file with one text per line")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--debug", action="store_true", help="an internal error shows its traceback")


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint, snapshot or crossover_final.pth")
    p.add_argument("--data", action="append", required=True,
                   help="dilemmas:PATH (Scruples dilemmas) or any data spec; repeatable: one JSON line each")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="all records (default), or that split of them by the checkpoint's split fractions")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (does not change any result)")


def crossover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", default="training")
    p.add_argument("--run-id", help="which run in the directory (default: the newest with snapshots)")
    p.add_argument("--set", action="append", default=[], help="override sweetspot.* / crossover.* values")
    p.add_argument("--device", default="auto")
    p.add_argument("--debug", action="store_true")


def plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", default="training")
    p.add_argument("--run-id")
    p.add_argument("--out", help="output PNG path (default: logs/training_curves_<run>.png in the run directory)")
    p.add_argument("--dpi", type=float, default=100, help="image resolution, dots per inch (default 100: 1300x1000 pixels)")


@dataclass(frozen=True)
class Command:
    handler: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS = {
    "unified-test": Command(train_command, "quick end-to-end run: LR sweep -> 2 epochs -> Sweet Spot -> Crossover",
                            training_arguments("number of epochs")),
    "unified-train": Command(train_command, "full training (60 epochs by default)",
                             training_arguments("number of epochs")),
    "unified-test-v1": Command(unified_test_v1, "the quick test on the legacy 800M and 320M presets",
                               training_arguments("number of epochs")),
    "train-local": Command(train_command, "training on a few samples with memory monitored every step",
                           training_arguments("number of training samples (default 3)")),
    "validate": Command(validate, "integrity check without training", validate_arguments),
    "info": Command(info, "a preset's trainable parameters per module, as JSON", info_arguments),
    "predict": Command(predict, "predict the four heads for texts with a trained checkpoint", predict_arguments),
    "evaluate": Command(evaluate, "score a checkpoint on data: every head's metrics, or Scruples dilemmas",
                        evaluate_arguments),
    "crossover": Command(crossover, "run Sweet Spot and Parameter Crossover on a finished run directory",
                         crossover_arguments),
    "plot": Command(plot, "draw the training curves of a run from its metrics record", plot_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="redheart", description="Red Heart AI training system")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.argv = argv  # for the launcher, which runs the same command again
    try:
        return COMMANDS[args.command].handler(args)
    except KeyboardInterrupt:
        print("error: interrupted before the run could stop cleanly (nothing of it was saved since its "
              "last checkpoint)", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except OSError as exc:  # an unusable path given by the user: a file where a folder is needed, ...
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except Exception as exc:
        if isinstance(exc, exitcodes.user_error_types()):
            print(f"error: {exc}", file=sys.stderr)
            return exitcodes.USAGE
        if getattr(args, "debug", False):
            raise
        where = _traceback_to_log_file()
        print(f"error: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(traceback {'in ' + where if where else 'with --debug'})", file=sys.stderr)
        return exitcodes.INTERNAL


def _traceback_to_log_file() -> str | None:
    """Write the current exception's traceback to the run's log file, if one is open."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.stream.write(traceback.format_exc())
            h.flush()
            return h.baseFilename
    return None
