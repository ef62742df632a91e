"""Model FLOPs of a training step, for throughput and MFU (model FLOP utilisation).

Counted from the shapes, part by part, as they run: the Transformer layers and the towers'
pooling per token (attention adds 4 * L^2 * hidden per layer and text), the towers' output
MLPs per text. A backward costs twice its forward, except the input projection's (no gradient
flows into the frozen encoder: the weight gradient alone, once its forward). Only the towers
the step runs count: training leaves out those whose head has no targets in the step (on the
public corpus SURD never has targets, and Scruples texts no emotion; `step.towers_run`).
The frozen encoder's forward is counted when it runs (not when its states come from the
cache). A test checks the count against torch.utils.flop_counter on a real step.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from redheart import heads as head_table  # `heads` here: the towers a step runs
from redheart.config import ModelConfig

# all-MiniLM-L6-v2's layers: 4 h^2 + 2 h f weights each (h 384, f 1536), 2 FLOPs a weight a token
ENCODER = {"layer_params": 4 * 384**2 + 2 * 384 * 1536, "layers": 6, "hidden": 384}


def _layers(cfg: ModelConfig, n_layers: int, lengths: list[int]) -> float:
    """Forward FLOPs of `n_layers` Transformer layers over texts of these token lengths."""
    h, f = cfg.hidden, cfg.ffn_mult * cfg.hidden
    per_token = 2 * (4 * h * h + 2 * h * f)  # qkv + out projections, and the MLP
    return n_layers * (per_token * sum(lengths) + sum(4 * n * n * h for n in lengths))


def _projection(cfg: ModelConfig, lengths: list[int]) -> float:
    return 2 * cfg.encoder_dim * cfg.hidden * sum(lengths)


def _tower(cfg: ModelConfig, lengths: list[int], out_dim: int) -> float:
    """Forward FLOPs of one tower: its layers, the pooling (scores and weighted sum: 4 * hidden
    per token) and the output MLP (per text)."""
    h, m = cfg.hidden, cfg.tower_mlp
    return (_layers(cfg, cfg.tower_layers, lengths) + 4 * h * sum(lengths)
            + 2 * (h * m + m * h + h * out_dim) * len(lengths))


def train_flops(cfg: ModelConfig, lengths: list[int], rdrop: bool, encoder_runs: bool,
                heads: Iterable[str] | None = None) -> float:
    """FLOPs of the forward and the backward, doubled by R-Drop's second pass, plus the encoder's
    forward. `heads`: the towers the step runs (None: all; `step.towers_run`)."""
    projection, backbone = _projection(cfg, lengths), _layers(cfg, cfg.layers, lengths)
    towers = sum(_tower(cfg, lengths, h.size) for h in head_table.HEADS if heads is None or h.name in heads)
    top = _encoder_layers(cfg.encoder_trainable, lengths)  # the encoder's trained top layers
    # their input, the frozen layers' states, takes no gradient: not the first q, k, v products'
    top_input = 2 * 3 * ENCODER["hidden"] ** 2 * sum(lengths) if cfg.encoder_trainable else 0
    forward = projection + backbone + towers + top
    backward = projection + 2 * (backbone + towers + top) - top_input  # the projection: its weight gradient alone
    flops = (forward + backward) * (2 if rdrop else 1)
    if encoder_runs:  # its frozen layers
        flops += _encoder_layers(ENCODER["layers"] - cfg.encoder_trainable, lengths)
    return flops


def _encoder_layers(n_layers: int, lengths: list[int]) -> float:
    """Forward FLOPs of `n_layers` of the encoder's layers (all-MiniLM-L6-v2's shape)."""
    return n_layers * sum(2 * ENCODER["layer_params"] * n + 4 * n * n * ENCODER["hidden"] for n in lengths)


def measure_peak_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """bf16 matrix-product rate on random data (TFLOP/s), measured with CUDA events."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    del a, b
    return 2 * n**3 * iters / seconds / 1e12
