"""`evaluate`: a trained checkpoint scored on data, one JSON object per data spec on stdout.

    redheart evaluate --checkpoint CKPT --data dilemmas:PATH    # Scruples dilemmas
    redheart evaluate --checkpoint CKPT --data SPEC [--split test]

Scruples dilemmas (upstream JSONL: two short `actions`, `gold_label` the index of the action
the annotators judged less ethical) are an evaluation only, never a training source: the
action with the higher predicted regret is taken as the less ethical one, and `accuracy` is the
share of pairs where that is the gold label (a tie counts one half). An action's `id` is the id
of the Scruples anecdote it was written from, so the report also says how many pairs have an
action whose anecdote was in the checkpoint's training split (the score measures transfer from
judged stories to short action phrases) and the accuracy on the others.

Any other importable data gets every head's metrics, the same ones as the training report
(`head_metrics`), on all its records or on one split of it (`--split`, by the checkpoint's own
split fractions: `--split test` on the training corpus is the run's test split); for a model
with a fitted emotion temperature (crossover_final.pth), also the calibration error with it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redheart.config import Config
from redheart.data.dataset import SPLITS, TaskData, split_of, split_records, take_slice
from redheart.data.features import FeatureSource
from redheart.data.importers import iter_lines, load_data
from redheart.data.schema import DataError, Record
from redheart.ckpt.rebuild import model_from_checkpoint
from redheart.model.encoder import Encoder, Tokenizer
from redheart.train.evaluation import predict_split
from redheart.train.metrics import expected_calibration_error, head_metrics
from redheart.train.plan import amp_dtype

log = logging.getLogger("redheart")

RULE = "the action with the higher predicted regret is judged the less ethical (a tie counts one half)"


@dataclass
class Dilemma:
    id: str
    action_ids: tuple[str, str]
    actions: tuple[str, str]
    gold: int  # index of the action judged less ethical
    controversial: bool


def is_dilemmas_file(path: Path) -> bool:
    """Whether the first line is a Scruples dilemma (`actions` and `gold_label`)."""
    try:
        for _, line in iter_lines(path):
            obj = json.loads(line)
            return isinstance(obj, dict) and "actions" in obj and "gold_label" in obj
    except (DataError, ValueError):
        return False
    return False


def read_dilemmas(path: str | Path) -> list[Dilemma]:
    """The dilemmas of a JSONL file (gzip or plain); a bad line is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    out = []
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        where = (str(path), n)
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(*where, None, f"malformed JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise DataError(*where, None, f"expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "actions", "gold_label"):
            if key not in obj:
                raise DataError(*where, key, "missing (Scruples dilemma)")
        actions = obj["actions"]
        if not isinstance(actions, list) or len(actions) != 2:
            raise DataError(*where, "actions", "expected a list of two actions")
        ids, texts = [], []
        for i, a in enumerate(actions):
            if not isinstance(a, dict) or not isinstance(a.get("description"), str) or not a["description"].strip():
                raise DataError(*where, f"actions[{i}].description", "expected a non-empty text")
            if not isinstance(a.get("id"), str):
                raise DataError(*where, f"actions[{i}].id", "expected a string")
            ids.append(a["id"])
            texts.append(a["description"])
        gold = obj["gold_label"]
        if gold not in (0, 1) or isinstance(gold, bool):
            raise DataError(*where, "gold_label", f"expected 0 or 1, got {gold!r}")
        out.append(Dilemma(str(obj["id"]), (ids[0], ids[1]), (texts[0], texts[1]), gold,
                           bool(obj.get("controversial", False))))
    if not out:
        raise DataError(str(path), None, None, "no dilemmas")
    return out


def dilemma_accuracy(regret: list[tuple[float, float]], gold: list[int]) -> dict[str, float]:
    """Pure: accuracy of choosing the action with the higher regret as the less ethical one."""
    score, ties = 0.0, 0
    for (a, b), g in zip(regret, gold, strict=True):
        if a == b:
            score += 0.5
            ties += 1
        else:
            score += float((0 if a > b else 1) == g)
    n = len(gold)
    return {"accuracy": score / n if n else float("nan"), "n": n, "ties": ties}


class Scorer:
    """A checkpoint's predictions for records: the checkpoint's encoder and tokenizer, its
    model, the training code's `predict_split` (bf16 autocast on a GPU)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", batch_size: int = 32):
        name = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        self.device = torch.device(name)
        self.model, self.cfg, ckpt = model_from_checkpoint(checkpoint, self.device)
        # the crossover model's temperature for the emotion shares, fitted on validation (analysis.py)
        self.temperature = float((ckpt.get("calibration") or {}).get("emotion_temperature", 1.0))
        self.tokenizer = Tokenizer(self.cfg.model.encoder, self.cfg.model.max_tokens)
        self.encoder = Encoder.of(self.cfg.model).to(self.device)
        self.dtype = amp_dtype(self.cfg, self.device)
        self.batch_size = batch_size

    def predict(self, records: list[Record]) -> tuple[dict[str, torch.Tensor], TaskData]:
        data = TaskData(records, self.tokenizer([r.text for r in records]))
        states_dtype = self.dtype or torch.float32
        source = FeatureSource(self.encoder, data, self.device, states_dtype, self.tokenizer.pad_id, cache=False)
        return predict_split(self.model, source, self.batch_size, self.dtype), data


def training_ids(cfg: Config) -> tuple[set[str] | None, str]:
    """The record ids of the checkpoint's training split, read from its own data (None if
    that data is not readable here), and what the answer rests on."""
    try:
        records = load_data(cfg.data.paths, skip_bad=True).records
    except (DataError, OSError) as exc:
        return None, f"the checkpoint's data is not readable here ({exc}); by the split of the ids alone"
    if cfg.data.max_records:
        records = take_slice(records, cfg.data.max_records)
    train = split_records(records, cfg.data.train_frac, cfg.data.val_frac)["train"]
    if cfg.data.max_train_records:
        train = take_slice(train, cfg.data.max_train_records)
    return {r.id for r in train}, "the checkpoint's training data"


def evaluate_dilemmas(scorer: Scorer, path: str | Path) -> dict[str, Any]:
    dilemmas = read_dilemmas(path)
    records = [Record(id=f"{d.id}#{i}", text=t) for d in dilemmas for i, t in enumerate(d.actions)]
    pred, _ = scorer.predict(records)
    regret = pred["regret"].view(-1, 2).tolist()
    gold = [d.gold for d in dilemmas]
    result: dict[str, Any] = {"data": f"dilemmas:{path}", "kind": "dilemmas", **dilemma_accuracy(regret, gold),
                              "rule": RULE}
    ids, basis = training_ids(scorer.cfg)
    cfg = scorer.cfg

    def trained_on(action_id: str) -> bool:
        rid = f"scruples-{action_id}"
        if ids is not None:
            return rid in ids
        return split_of(rid, cfg.data.train_frac, cfg.data.val_frac) == "train"

    seen = [any(trained_on(a) for a in d.action_ids) for d in dilemmas]
    unseen = [i for i, s in enumerate(seen) if not s]
    result["pairs_with_an_action_from_the_training_split"] = sum(seen)
    result["training_split_basis"] = basis
    result["accuracy_without_those"] = dilemma_accuracy([regret[i] for i in unseen], [gold[i] for i in unseen])["accuracy"]
    contro = [i for i, d in enumerate(dilemmas) if d.controversial]
    if contro:
        result["controversial"] = dilemma_accuracy([regret[i] for i in contro], [gold[i] for i in contro])
    return result


def evaluate_data(scorer: Scorer, spec: str, split: str = "all") -> dict[str, Any]:
    records = load_data([spec], skip_bad=False).records
    cfg = scorer.cfg
    if split != "all":
        records = [r for r in records if split_of(r.id, cfg.data.train_frac, cfg.data.val_frac) == split]
    if not records:
        raise DataError(spec, None, None, f"no records in the {split} split" if split != "all" else "no records")
    pred, data = scorer.predict(records)
    tgt = data.targets(torch.arange(len(data)))
    metrics = head_metrics(pred, tgt, cfg.train.head_weights)
    out = {"data": spec, "kind": "heads", "split": split, "records": len(records), "metrics": metrics}
    if scorer.temperature != 1.0 and int(tgt["emotion_mask"].sum()) > 0:
        m = tgt["emotion_mask"]
        out["calibration"] = {"emotion_temperature": scorer.temperature, "emotion_ece": expected_calibration_error(
            pred["emotion"][m], tgt["emotion"][m], temperature=scorer.temperature)}
    return out


def evaluate_spec(scorer: Scorer, spec: str, split: str = "all") -> dict[str, Any]:
    """`dilemmas:PATH` (or a file whose first line is a dilemma), else any importable data."""
    if spec.startswith("dilemmas:"):
        return evaluate_dilemmas(scorer, spec.split(":", 1)[1])
    if Path(spec).is_file() and is_dilemmas_file(Path(spec)):
        return evaluate_dilemmas(scorer, spec)
    return evaluate_data(scorer, spec, split)


def evaluate_command(args) -> int:
    """One JSON object per --data on stdout; a bad input is one line on stderr and exit code 2."""
    if args.split not in ("all", *SPLITS):
        raise ValueError(f"--split: all, train, val or test (got {args.split!r})")
    scorer = Scorer(args.checkpoint, args.device, args.batch_size)
    for spec in args.data:
        print(json.dumps(evaluate_spec(scorer, spec, args.split), allow_nan=True), flush=True)
    return 0
