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

from redheart.config import ModelConfig
from redheart.model.network import HEAD_SIZES

ENCODER = {"params_per_token": 21.3e6, "layers": 6, "hidden": 384}  # all-MiniLM-L6-v2 without embeddings


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
    forward. `heads`: the towers the step runs (None: all four; `step.towers_run`)."""
    projection, backbone = _projection(cfg, lengths), _layers(cfg, cfg.layers, lengths)
    towers = sum(_tower(cfg, lengths, d) for name, d in HEAD_SIZES.items() if heads is None or name in heads)
    forward = projection + backbone + towers
    backward = projection + 2 * (backbone + towers)  # the projection: its weight gradient alone
    flops = (forward + backward) * (2 if rdrop else 1)
    if encoder_runs:
        flops += sum(2 * ENCODER["params_per_token"] * n + ENCODER["layers"] * 4 * n * n * ENCODER["hidden"]
                     for n in lengths)
    return flops


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
