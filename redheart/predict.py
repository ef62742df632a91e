"""Using a trained model: texts in, the four heads out, by name.

    from redheart.predict import Predictor
    p = Predictor("training/checkpoints_final/crossover_final.pth")
    p(["I lied to my friend and she found out."])  # -> list of dicts
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


class Predictor:
    def __init__(self, checkpoint: str | Path, device: str = "cpu", batch_size: int = 16):
        self.device = torch.device(device)
        self.model, self.cfg, _ = model_from_checkpoint(checkpoint, self.device)
        self.tokenizer = Tokenizer(self.cfg.model.encoder, self.cfg.model.max_tokens)
        self.encoder = Encoder(self.cfg.model.encoder).to(self.device, torch.float32)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[dict[str, Any]]:
        if not texts:
            return []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i + 1}: empty text")
        data = TaskData([Record(id=str(i), text=t) for i, t in enumerate(texts)], self.tokenizer(texts))
        out: list[dict[str, Any]] = []
        for s in range(0, len(texts), self.batch_size):
            idx = list(range(s, min(s + self.batch_size, len(texts))))
            batch = collate(data, idx, self.tokenizer.pad_id)
            keep = batch.keep.to(self.device)
            states = self.encoder(batch.input_ids.to(self.device), keep)
            pred = self.model(states, keep, batch.padded)
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


def predict_command(args) -> int:
    texts = list(args.texts)
    if not texts:
        src = open(args.file, encoding="utf-8") if args.file else sys.stdin
        with src:
            texts = [line.rstrip("\n") for line in src if line.strip()]
    if not texts:
        print("error: no texts given (as arguments, --file, or lines on stdin)", file=sys.stderr)
        return 2
    for row in Predictor(args.checkpoint, args.device)(texts):
        print(json.dumps(row, ensure_ascii=False))
    return 0
