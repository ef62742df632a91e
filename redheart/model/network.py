"""The trainable Red Heart network: input projection, a pre-norm Transformer backbone and a
task tower per head (redheart/heads.py). It reads the frozen encoder's token states, so the
encoder's weights are never in its state dict; every parameter name starts with its module
(`backbone.`, `emotion.`, ...).
"""
from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from redheart import heads as head_table  # `heads` here: the towers a forward runs
from redheart.config import ModelConfig
from redheart.model.lowp import Linear
from redheart.model.packing import Packing, pack, unpack
from redheart.model.varlen import varlen_attention

# The heads' output sizes, for readers outside the package (bench/); the network reads the table.
HEAD_SIZES = {h.name: h.size for h in head_table.HEADS}
# The encoder's top layers when they are trained (model.encoder_trainable): part of the backbone
# module (its sweet spot, its crossover), at their own LR (trainer.param_groups).
ENCODER_TOP = "backbone.encoder_top."


def head_values(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's outputs as predictions (`Head.prediction`): the `values` heads' in [0, 1]
    (sigmoid of their logits: the network gives logits, on which the loss keeps a gradient where
    the sigmoid saturates, losses.py); the distributions stay logits (softmax gives their shares)."""
    return {k: head_table.get(k).prediction(v) for k, v in out.items()}


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.out = Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                index: torch.Tensor | None = None, cu: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        dropout = self.dropout if self.training else 0.0
        if cu is not None:  # packed rows: attention within each text's segment (varlen.py)
            rows, width, h = x.shape
            q, k, v = qkv.view(rows * width, 3, self.heads, h // self.heads).unbind(1)
            return self.out(varlen_attention(q, k, v, cu, width, dropout).view(rows, width, h))
        if index is not None:  # packed rows: attention runs in the padded layout (packing.py)
            qkv = unpack(qkv, index, attn_mask.shape[0], attn_mask.shape[-1])
        b, n, h = qkv.shape[0], qkv.shape[1], x.shape[-1]
        q, k, v = qkv.view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout
        ).transpose(1, 2).reshape(b, n, h)
        if index is not None:
            y = pack(y, index, x.shape[0], x.shape[1])
        return self.out(y)


class Block(nn.Module):
    """Pre-norm Transformer layer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = Linear(hidden, ffn)
        self.fc2 = Linear(ffn, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                index: torch.Tensor | None = None, cu: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask, index, cu))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.ln2(x))))))


class Stack(nn.Module):
    """Layers run in order, optionally with activation checkpointing per layer."""

    def __init__(self, cfg: ModelConfig, n: int):
        super().__init__()
        ffn = cfg.ffn_mult * cfg.hidden
        self.layers = nn.ModuleList(Block(cfg.hidden, cfg.heads, ffn, cfg.dropout) for _ in range(n))
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                index: torch.Tensor | None = None, cu: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, index, cu, use_reentrant=False)
            else:
                x = layer(x, attn_mask, index, cu)
        return x


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = Linear(cfg.encoder_dim, cfg.hidden)
        self.stack = Stack(cfg, cfg.layers)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.encoder_top: nn.Module | None = None  # RedHeartNet sets it (after the random init)

    def forward(self, states: torch.Tensor, attn_mask: torch.Tensor | None,
                packing: Packing | None = None) -> torch.Tensor:
        if self.encoder_top is not None:  # in the padded layout, before any packing
            states = self.encoder_top(states, attn_mask)
        if packing is None:
            return self.norm(self.stack(self.proj(states), attn_mask))
        return self.norm(self.stack(self.proj(packing.pack(states)), attn_mask, packing.index, packing.cu))


class Tower(nn.Module):
    """A task head: its own layers, attention pooling over tokens, and an output MLP."""

    def __init__(self, cfg: ModelConfig, out_dim: int):
        super().__init__()
        self.stack = Stack(cfg, cfg.tower_layers)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.pool = Linear(cfg.hidden, 1, bias=False)  # a bias would shift every score alike: no gradient
        self.mlp = nn.Sequential(
            Linear(cfg.hidden, cfg.tower_mlp),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            Linear(cfg.tower_mlp, cfg.hidden),
            nn.GELU(),
            Linear(cfg.hidden, out_dim),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, keep: torch.Tensor,
                packing: Packing | None = None) -> torch.Tensor:
        if packing is None:
            x = self.norm(self.stack(x, attn_mask))
        else:
            x = self.norm(self.stack(x, attn_mask, packing.index, packing.cu))
            x = packing.unpack(x)  # each text's tokens back in its own row for the pooling
        scores = self.pool(x).squeeze(-1).float().masked_fill(~keep, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(x.dtype)
        pooled = torch.einsum("bn,bnh->bh", weights, x)
        return self.mlp(pooled)


class RedHeartNet(nn.Module):
    """Token states (B, L, encoder_dim) and a padding mask (B, L; True = token) in; a dict of
    logits out, one per head of the table as the network was built (`head_names`): `emotion`
    (B, 7), `bentham` (B, 10), `regret` (B,), `surd` (B, 4); `head_values` turns them into
    predictions. With a
    `packing` (redheart/model/packing.py) the layers run on the texts packed into rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        # in table order: the order of the parameters, so of the random initialisation
        self.head_names = head_table.names()
        for h in head_table.HEADS:
            setattr(self, h.name, Tower(cfg, h.size))
        self.apply(self._init)
        # Scale residual-branch outputs by depth so the residual stream starts near unit scale.
        depth = cfg.layers + cfg.tower_layers
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * max(depth, 1)))
        if cfg.encoder_trainable:  # the encoder's own top layers, with its pretrained weights
            from redheart.model.bert import BertTop
            from redheart.model.encoder import encoder_dir

            with torch.random.fork_rng(devices=[]):  # building them draws nothing from the run's stream
                self.backbone.encoder_top = BertTop(encoder_dir(cfg.encoder), cfg.encoder_trainable, cfg.dropout)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self, states: torch.Tensor, keep: torch.Tensor, padded: bool | None = None,
        packing: Packing | None = None, heads: Collection[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`heads`: the towers to run (None: all); training leaves out the heads without
        targets in the step, whose outputs nothing would read."""
        # A boolean SDPA mask: True where a key may be attended to. Skipped when nothing is
        # padded (the collator knows that on the host, so no device sync is needed here).
        if padded is None:
            padded = not bool(keep.all())
        attn_mask = keep[:, None, None, :] if padded or packing is not None else None
        x = self.backbone(states, attn_mask, packing)
        out = {}
        for name in self.head_names:  # in this order whatever `heads` holds: the dropout streams stay put
            if heads is not None and name not in heads:
                continue
            y = getattr(self, name)(x, attn_mask, keep, packing)
            out[name] = y.squeeze(-1) if y.shape[-1] == 1 else y  # a one-value head: (B,)
        return out
