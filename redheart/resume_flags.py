"""Command-line settings against the state a run resumes from.

A resumed run (or a start from an epoch snapshot) trains with the settings it was saved with:
an exact continuation needs them. A flag asking for another value is therefore refused, each
one named with what the state has, instead of being ignored without a word. The settings that
may change on resume are taken from the command line (`CHANGEABLE`): the number of epochs (the
schedule is recomputed, with a warning), the device and how this launch shares the work
(--gpus, train.parallel), and how often it logs and saves mid-epoch resume states.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from redheart.config import Config, ConfigError, load_yaml, parse_assignment

CHANGEABLE = {"train.epochs": "--epochs", "train.device": "--device", "train.parallel": "--set train.parallel",
              "train.log_every": "--set train.log_every",
              "train.resume_every_minutes": "--set train.resume_every_minutes", "sweetspot.": "--set sweetspot.*",
              "crossover.": "--set crossover.*",  # the analysis after training, not the training itself
              "data.eval_paths": "--eval-data"}  # scored after training, never trained on


def changeable(key: str) -> bool:
    return key in CHANGEABLE or any(key.startswith(k) for k in CHANGEABLE if k.endswith("."))


def take_changeable(saved: Config, asked_cfg: Config, asked: dict[str, str]) -> None:
    """The changeable settings the command line names, into the saved config (not the epochs:
    the caller warns about those)."""
    from redheart.config import set_value

    for key in asked:
        if changeable(key) and key != "train.epochs":
            set_value(saved, key, get_value(asked_cfg, key), origin=asked[key])


def asked_settings(args, mode: str, samples: int | None) -> dict[str, str]:
    """Config key -> the flag that set it, for every setting the command line names explicitly
    (not the preset's or the mode's defaults): the flags, each --set, each key of each --config."""
    asked: dict[str, str] = {}
    for path in args.config:
        try:
            data = load_yaml(path)
        except ConfigError:
            continue
        for key in _leaf_keys(data):
            asked[key] = f"--config {path} ({key})"
    flags = {"preset": ("--preset", args.preset), "train.micro_batch": ("--batch-size", args.batch_size),
             "train.lr": ("--lr", args.lr), "train.seed": ("--seed", args.seed),
             "data.max_records": ("--max-records", args.max_records),
             "data.skip_bad_records": ("--skip-bad-records", True if args.skip_bad_records else None),
             "data.paths": ("--data", args.data or None), "train.epochs": ("--epochs", args.epochs),
             "data.eval_paths": ("--eval-data", getattr(args, "eval_data", None) or None),
             "train.device": ("--device", args.device)}
    if args.lr_sweep is not None:
        flags["sweep.enabled"] = ("--lr-sweep" if args.lr_sweep else "--no-lr-sweep", args.lr_sweep)
    if args.batch_size == "auto":  # the probe's choice was saved with the run: nothing to compare
        flags.pop("train.micro_batch")
    if samples is not None:  # --samples N or SAMPLES=N: the number of epochs, or train-local's samples
        if mode == "train-local":
            flags["data.max_train_records"] = ("--samples", samples)
        elif args.epochs is None:
            flags["train.epochs"] = ("--samples", samples)
    for key, (flag, value) in flags.items():
        if value is not None:
            asked[key] = f"{flag} {_show_flag(value)}" if value is not True else flag
    for text in args.set:
        try:
            key, value = parse_assignment(text)
        except ConfigError:
            continue
        for leaf in _leaf_keys(value, key) if isinstance(value, dict) else [key]:
            asked[leaf] = f"--set {text}"
    return asked


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix] if prefix else []
    out = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _leaf_keys(v, key) if isinstance(v, dict) else [key]
    return out


def _show_flag(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def get_value(cfg: Config, key: str) -> Any:
    """The value of a dotted key (`train.lr`, `train.head_weights.surd`, `preset`)."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]" if value else "none"
    return str(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def conflicts(saved: Config, asked_cfg: Config, asked: dict[str, str]) -> list[str]:
    """'FLAG (the state: VALUE)' for every asked setting, other than the changeable ones, whose
    value differs from the state's."""
    out = []
    for key, flag in asked.items():
        if changeable(key):
            continue
        try:
            want, have = get_value(asked_cfg, key), get_value(saved, key)
        except (AttributeError, KeyError, TypeError):
            continue
        if not _same(want, have):
            out.append(f"{flag} (the state has {key} = {_show(have)})")
    return out


def conflict_message(source: str, run_id: str, found: list[str]) -> str:
    changeable = ", ".join(sorted(set(CHANGEABLE.values())) + ["--gpus"])
    return (f"--resume {source}: run {run_id} was saved with other settings than the command line asks for, and a "
            f"resumed run keeps its own: " + "; ".join(found) + f". Leave these flags out to resume (on resume only "
            f"{changeable} may change), or start a new run with them (--restart, or another --output-dir)")
