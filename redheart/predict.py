"""Using a trained model: texts in, the heads (redheart/heads.py) out, by name.

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
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from redheart import heads
from redheart.data.dataset import TaskData, collate
from redheart.data.schema import Record
from redheart.ckpt.rebuild import model_from_checkpoint
from redheart.model.encoder import Encoder, Tokenizer
from redheart.model.network import head_values


def parse_device(name: str, what: str = "device") -> torch.device:
    """The device predict runs on: cpu, cuda or cuda:N of a GPU that is there; else a
    ValueError saying why (`what` names the setting)."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not m:
        raise ValueError(f"{what} {name}: not a device predict can use (cpu, cuda or cuda:N)")
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{what} {name}: no CUDA GPU is visible to PyTorch (use {what} cpu)")
        if int(m.group(1) or 0) >= n:
            raise ValueError(f"{what} {name}: only {n} CUDA GPU(s) visible (use {what} cpu or cuda:0 .. cuda:{n - 1})")
    return torch.device(name)


def _unpaired_surrogate(text: str) -> int | None:
    """The index of the first character of `text` that is half of a surrogate pair, if any (a
    str that is not Unicode text: the tokenizer cannot take it)."""
    m = re.search("[\ud800-\udfff]", text)
    return m.start() if m else None


class Predictor:
    def __init__(self, checkpoint: str | Path, device: str = "cpu", batch_size: int = 16):
        self.device = parse_device(str(device))
        self.model, self.cfg, ckpt = model_from_checkpoint(checkpoint, self.device)
        # the emotion temperature fitted on validation after the crossover (1: other checkpoints)
        self.temperature = float((ckpt.get("calibration") or {}).get("emotion_temperature", 1.0))
        self.tokenizer = Tokenizer(self.cfg.model.encoder, self.cfg.model.max_tokens)
        self.encoder = Encoder.of(self.cfg.model).to(self.device, torch.float32)
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
            if (j := _unpaired_surrogate(t)) is not None:
                raise ValueError(f"text {i + 1}: not valid Unicode (an unpaired surrogate at character {j + 1})")
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
            shown = {h: heads.get(h).output(p, self.temperature if h == "emotion" else 1.0).cpu()
                     for h, p in pred.items()}
            for row, i in enumerate(idx):
                out.append({"text": texts[i], **{h: heads.get(h).named(v[row]) for h, v in shown.items()}})
        return out


def _as_bytes(text: str) -> bytes:
    """The bytes a str read from the system stands for: Python reads bytes that are not UTF-8
    (in arguments, and on stdin under a C or UTF-8 locale) as the surrogates U+DC80..U+DCFF."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other surrogates: not from the system, and not UTF-8 either
        return text.encode("utf-8", "surrogatepass")


def json_line(row: dict) -> str:
    """One JSON object on one line, by any reader's rule: JSON leaves U+0085, U+2028 and U+2029
    unescaped, which Python's splitlines (and JavaScript before ES2019) take for line ends."""
    text = json.dumps(row, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def utf8_text(data: bytes, where: Callable[[int], str], by_line: bool = True) -> str:
    """`data` decoded as UTF-8; else a ValueError at `where(line)` (its first byte that is not
    UTF-8: the line from 1, and the column, counted in bytes from the start of the line, or of
    `data` when not `by_line`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1 if by_line else 0) + 1
        raise ValueError(f"{where(line)}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column})") from None


def read_texts(args) -> list[str]:
    """The texts of a `predict` call: the arguments, else the lines of --file, else of stdin
    (blank lines skipped). Raises ValueError when there is none to read, or when one is not
    UTF-8 text (naming the argument, or the line of the file or of stdin)."""
    if args.texts:
        return [utf8_text(_as_bytes(t), lambda _, i=i: f"argument {i}", by_line=False)
                for i, t in enumerate(args.texts, start=1)]
    if args.file:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"--file {args.file}: {exc.strerror or exc}") from None
        text = utf8_text(data, lambda line: f"{args.file}:{line}")
        where = f"--file {args.file}"
    elif sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no texts given: pass them as arguments, with --file, or one a line on stdin")
    else:
        buffer = getattr(sys.stdin, "buffer", None)  # the bytes, before any decoding
        data = buffer.read() if buffer is not None else _as_bytes(sys.stdin.read())
        text = utf8_text(data, lambda line: f"stdin line {line}")
        where = "stdin"
    # lines end at \n (and \r\n) only, as the error messages count them: U+2028, U+0085 and the
    # like are characters of a text, not line ends (str.splitlines would cut a text in two)
    lines = text.removeprefix("\ufeff").split("\n")  # (a byte-order mark)
    texts = [line.removesuffix("\r") for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"no texts given: {where} holds no non-blank line")
    return texts


def predict_command(args) -> int:
    """JSON lines on stdout, one per text; a usage error is one line on stderr and exit code 2."""
    try:
        device = parse_device(args.device, "--device")
        texts = read_texts(args)
        rows = Predictor(args.checkpoint, device)(texts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json_line(row))
    return 0
