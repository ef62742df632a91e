"""Model FLOPs of a training step, for throughput and MFU (model FLOP utilisation).

Counted from the shapes, not from 6 x params x tokens: the towers' pooling MLPs run once per
sample, not per token, and attention adds 4 * L^2 * hidden per layer and sample forward.
A backward pass costs twice the forward. The frozen encoder's forward is counted when it
runs (not when its states come from the cache).
"""
from __future__ import annotations



import torch

from redheart.config import ModelConfig

ENCODER = {"params_per_token": 21.3e6, "layers": 6, "hidden": 384}  # all-MiniLM-L6-v2 without embeddings


def forward_flops(cfg: ModelConfig, lengths: list[int]) -> float:
    """Forward FLOPs of the trainable network for samples of the given token lengths."""
    h, f = cfg.hidden, cfg.ffn_mult * cfg.hidden
    layer_per_token = 2 * (4 * h * h + 2 * h * f)  # qkv + out projections, and the MLP
    layers = cfg.layers + 4 * cfg.tower_layers
    per_token = layers * layer_per_token + 2 * cfg.encoder_dim * h + 4 * 2 * h  # + input projection, pooling scores
    per_sample = 4 * 2 * (h * cfg.tower_mlp * 2 + h * 8)  # the four output MLPs
    tokens = sum(lengths)
    attention = sum(layers * 4 * n * n * h for n in lengths)
    return per_token * tokens + per_sample * len(lengths) + attention


def train_flops(cfg: ModelConfig, lengths: list[int], rdrop: bool, encoder_runs: bool) -> float:
    """FLOPs of forward + backward (x3), doubled by R-Drop's second pass, plus the encoder's forward."""
    flops = 3 * forward_flops(cfg, lengths) * (2 if rdrop else 1)
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
