"""A BERT encoder's forward pass in plain PyTorch, for the frozen sentence encoder.

transformers' AutoModel and AutoTokenizer take about 4.5 s to import and build on a CPU, paid
by every process that loads the encoder: each rank of a multi-GPU run, each `predict` call,
each resume. The encoder is frozen and of one well-known architecture, so this module reads
its `config.json` and `model.safetensors` directly (about 0.3 s) and runs the same
computation: embeddings (word + absolute position + token type 0) and LayerNorm, then post-norm
layers of self-attention and a GELU MLP. The tokenizer is the `tokenizers` library's, from
the encoder's `tokenizer.json` (the Rust tokenizer transformers itself wraps).

Encoders of other shapes (RoBERTa's position offsets, relative positions, other activations)
go through transformers (redheart/model/encoder.py). tests/test_encoder.py checks token ids
and token states against transformers on the real encoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "model.safetensors"


def supports(path: Path) -> bool:
    """Whether the encoder at `path` is a plain BERT this module runs exactly."""
    if not (path / WEIGHTS).is_file():
        return False
    cfg = json.loads((path / "config.json").read_text())
    return (cfg.get("model_type") == "bert" and cfg.get("position_embedding_type", "absolute") == "absolute"
            and cfg.get("hidden_act") == "gelu" and not cfg.get("is_decoder", False))


def _container(**modules: nn.Module) -> nn.Module:
    """A module holding `modules` under their names: the parameter names stay the checkpoint's."""
    m = nn.Module()
    for name, module in modules.items():
        m.add_module(name, module)
    return m


class Bert(nn.Module):
    """BERT token states: ids (B, L) and a padding mask (B, L; True = token) in, (B, L, D) out."""

    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = int(cfg["hidden_size"]), float(cfg.get("layer_norm_eps", 1e-12))
        self.heads, self.dim = int(cfg["num_attention_heads"]), h
        self.embeddings = _container(
            word_embeddings=nn.Embedding(cfg["vocab_size"], h),
            position_embeddings=nn.Embedding(cfg["max_position_embeddings"], h),
            token_type_embeddings=nn.Embedding(cfg.get("type_vocab_size", 2), h),
            LayerNorm=nn.LayerNorm(h, eps=eps))
        inter = int(cfg["intermediate_size"])
        layers = [_container(
            attention=_container(self=_container(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
                                 output=_container(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=eps))),
            intermediate=_container(dense=nn.Linear(h, inter)),
            output=_container(dense=nn.Linear(inter, h), LayerNorm=nn.LayerNorm(h, eps=eps)),
        ) for _ in range(int(cfg["num_hidden_layers"]))]
        self.encoder = _container(layer=nn.ModuleList(layers))

    @classmethod
    def load(cls, path: Path) -> "Bert":
        """The encoder at `path` with its weights (fp32); a missing or misshapen weight is an error."""
        from safetensors.torch import load_file

        model = cls(json.loads((path / "config.json").read_text()))
        saved = load_file(str(path / WEIGHTS))
        saved = {k.removeprefix("bert."): v for k, v in saved.items()}
        own = model.state_dict()
        missing = sorted(set(own) - set(saved))
        if missing:
            raise KeyError(f"{path / WEIGHTS} lacks {len(missing)} weights of a BERT encoder, e.g. {missing[:3]}")
        model.load_state_dict({k: saved[k].float() for k in own})  # the pooler and position_ids are not used
        return model.eval().requires_grad_(False)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Token states after the first `layers` layers (None: all of them)."""
        n = ids.shape[1]
        e = self.embeddings
        x = (e.word_embeddings(ids) + e.position_embeddings.weight[:n] + e.token_type_embeddings.weight[0])
        x = e.LayerNorm(x)
        mask = keep[:, None, None, :]  # keys that may be attended to
        for layer in self.encoder.layer[:layers]:
            x = bert_layer(layer, x, mask, self.heads)
        return x


def bert_layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, heads: int,
               dropout: float = 0.0) -> torch.Tensor:
    """One post-norm BERT layer (a `Bert.encoder.layer` entry); `mask` (B, 1, 1, L), True =
    a key that may be attended to. `dropout` where the layer is trained (BertTop)."""
    b, n, dim = x.shape
    att = layer.attention
    q, k, v = (lin(x).view(b, n, heads, -1).transpose(1, 2) for lin in (att.self.query, att.self.key, att.self.value))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout).transpose(1, 2).reshape(b, n, dim)
    x = att.output.LayerNorm(x + _dropout(att.output.dense(y), dropout))
    return layer.output.LayerNorm(x + _dropout(layer.output.dense(F.gelu(layer.intermediate.dense(x))), dropout))


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


class BertTop(nn.Module):
    """The top `n` layers of a BERT encoder as a trainable module (`model.encoder_trainable`):
    the frozen encoder stops `n` layers short (`Bert.forward(layers=...)`), and these layers,
    starting from the encoder's own weights, run inside the network and learn. Their parameter
    names are the encoder's (`layer.0.attention.self.query.weight`, ...), renumbered from 0."""

    def __init__(self, path: Path, n: int, dropout: float):
        super().__init__()
        cfg = json.loads((path / "config.json").read_text())
        total = int(cfg["num_hidden_layers"])
        if not 0 < n <= total:
            raise ValueError(f"model.encoder_trainable={n}: the encoder at {path} has {total} layers")
        full = Bert.load(path)
        self.heads, self.dropout = full.heads, dropout
        self.layer = nn.ModuleList(full.encoder.layer[total - n:])
        self.requires_grad_(True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        for layer in self.layer:
            x = bert_layer(layer, x, mask, self.heads, dropout)
        return x


class FastTokenizer:
    """The encoder's `tokenizer.json` through the `tokenizers` library: ids with [CLS]/[SEP],
    truncated to `max_tokens` (specials included), never padded (the collator pads)."""

    def __init__(self, path: Path, max_tokens: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.no_padding()  # the file may carry its own padding and truncation settings
        self.tok.enable_truncation(max_tokens)
        special = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                special = {**json.loads((path / name).read_text()), **special}
        pad = special.get("pad_token", "[PAD]")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_id = self.tok.token_to_id(pad) or 0

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]
