"""Using a trained model: texts in, the four heads out, by name.

    from redheart.predict import Predictor
    p = Predictor("training/checkpoints_final/crossover_final.pth")  # any checkpoint; CPU by default
    p(["I lied to my friend and she found out."])  # -> list of dicts
    p("I lied to my friend and she found out.")    # -> one dict

    redheart predict --checkpoint PATH "text" ...   # or --file texts.txt, or lines on stdin
    # -> one JSON line per text: {"text", "emotion": {name: share}, "bentham": {name: value},
    #    "regret": value, "surd": {name: share}}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from redheart.data.dataset import TaskData, collate
from redheart.data.schema import BENTHAM, EMOTIONS, SURD, Record
from redheart.model.build import model_from_checkpoint
from redheart.model.encoder import Encoder, Tokenizer
from redheart.model.network import head_values


class Predictor:
    def __init__(self, checkpoint: str | Path, device: str = "cpu", batch_size: int = 16):
        self.device = torch.device(device)
        self.model, self.cfg, _ = model_from_checkpoint(checkpoint, self.device)
        self.tokenizer = Tokenizer(self.cfg.model.encoder, self.cfg.model.max_tokens)
        self.encoder = Encoder(self.cfg.model.encoder).to(self.device, torch.float32)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str] | str) -> list[dict[str, Any]] | dict[str, Any]:
        """One dict per text (one dict for a single string): `emotion` and `surd` as shares
        summing to 1, `bentham` values in [0, 1] by name, `regret` in [0, 1]."""
        if isinstance(texts, str):
            return self([texts])[0]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i + 1}: empty text")
        if not texts:
            return []
        data = TaskData([Record(id=str(i), text=t) for i, t in enumerate(texts)], self.tokenizer(texts))
        out: list[dict[str, Any]] = []
        for s in range(0, len(texts), self.batch_size):
            idx = list(range(s, min(s + self.batch_size, len(texts))))
            batch = collate(data, idx, self.tokenizer.pad_id)
            keep = batch.keep.to(self.device)
            states = self.encoder(batch.input_ids.to(self.device), keep)
            pred = head_values(self.model(states, keep, batch.padded))
            emo = torch.softmax(pred["emotion"].float(), -1).cpu()
            surd = torch.softmax(pred["surd"].float(), -1).cpu()
            ben, reg = pred["bentham"].float().cpu(), pred["regret"].float().cpu()
            for row, i in enumerate(idx):
                out.append({
                    "text": texts[i],
                    "emotion": {n: round(float(v), 4) for n, v in zip(EMOTIONS, emo[row])},
                    "bentham": {n: round(float(v), 4) for n, v in zip(BENTHAM, ben[row])},
                    "regret": round(float(reg[row]), 4),
                    "surd": {n: round(float(v), 4) for n, v in zip(SURD, surd[row])},
                })
        return out


def read_texts(args) -> list[str]:
    """The texts of a `predict` call: the arguments, else the lines of --file, else of stdin
    (blank lines skipped). Raises ValueError when there is none to read."""
    if args.texts:
        return list(args.texts)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ValueError(f"--file {args.file}: {exc.strerror or exc}") from None
        where = f"--file {args.file}"
    elif sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no texts given: pass them as arguments, with --file, or one a line on stdin")
    else:
        lines = sys.stdin.read().splitlines()
        where = "stdin"
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"no texts given: {where} holds no non-blank line")
    return texts


def predict_command(args) -> int:
    """JSON lines on stdout, one per text; a usage error is one line on stderr and exit code 2."""
    try:
        texts = read_texts(args)
        rows = Predictor(args.checkpoint, args.device)(texts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return 0
