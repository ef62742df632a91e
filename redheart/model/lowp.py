"""Low-precision weight copies for the Linear layers, cast once per optimizer step, with the
weight gradients accumulated in fp32 by the weight-gradient matrix product itself.

Under plain autocast every micro-batch pays three passes over all the weights that do not
depend on its size: the forward casts each fp32 weight to bf16, the backward casts each bf16
weight gradient back to fp32, and AccumulateGrad adds it into `.grad`. At micro-batch 2 of the
730m preset on an H200 these copies and additions took about half of the GPU's time (profile
in bench/RESULTS.md). Here the forward reads a bf16 copy refreshed once per optimizer step, and
the backward writes the weight gradient straight into the fp32 `.grad` with cuBLAS (`addmm`
with beta=1 and an fp32 output, as Megatron-LM's gradient-accumulation fusion does). Where that
kernel is missing (CPU) the product is computed in bf16 and added, exactly what autocast does.

Only training with gradients uses the copies; evaluation reads the fp32 weights as before, so
a weight swapped in from elsewhere (EMA, a snapshot) is never read stale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """`nn.Linear` that, while `low` holds (weight, bias) copies, trains from them."""

    low: tuple[torch.Tensor, torch.Tensor | None] | None = None
    fused: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low is not None and self.training and torch.is_grad_enabled():
            return _linear(x, self.low[0], self.low[1], self.weight, self.bias, self.fused)
        return super().forward(x)


def accumulate_wgrad(grad: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, fused: bool) -> None:
    """grad (fp32, out x in) += gy^T @ x for low-precision gy (N x out) and x (N x in)."""
    if fused:
        torch.addmm(grad, gy.t(), x, out_dtype=torch.float32, out=grad)
    else:
        grad.add_(gy.t() @ x)


class _LowpLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w16, b16, weight, bias, fused):  # weight/bias: inputs so backward runs
        xl = x.to(w16.dtype)
        ctx.save_for_backward(xl, w16)
        ctx.params, ctx.fused, ctx.x_dtype = (weight, bias), fused, x.dtype
        return F.linear(xl, w16, b16)

    @staticmethod
    def backward(ctx, gy):
        xl, w16 = ctx.saved_tensors
        weight, bias = ctx.params
        gy = gy.to(w16.dtype)
        gy2, x2 = gy.reshape(-1, gy.shape[-1]), xl.reshape(-1, xl.shape[-1])
        accumulate_wgrad(weight.grad, gy2, x2, ctx.fused)
        if bias is not None:
            bias.grad.add_(gy2.sum(0, dtype=torch.float32))
        gx = (gy @ w16).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None


def _linear(x, w16, b16, weight, bias, fused):
    return _LowpLinear.apply(x, w16, b16, weight, bias, fused)


def fused_wgrad_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `addmm(..., out_dtype=float32, out=grad)` runs here and gives the exact sum."""
    try:
        def ramp(*shape):  # deterministic values: the probe must not draw from the random streams
            n = torch.tensor(shape).prod().item()
            return (torch.arange(n, device=device) % 7 - 3).reshape(shape).float() / 4

        g, a, b = ramp(64, 32), ramp(48, 64).to(dtype), ramp(48, 32).to(dtype)
        want = g + a.float().t() @ b.float()
        accumulate_wgrad(g, a, b, fused=True)
        return bool(torch.allclose(g, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class LowPrecisionCopies:
    """The copies of every trainable `Linear` of a model; `refresh()` once per optimizer step."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        global _linear
        if not hasattr(_linear, "_torchdynamo_disable"):
            # its backward writes `.grad` in place: kept out of compiled regions. Marked here, where
            # the copies come into use, not at import: torch.compiler.disable imports torch._dynamo
            # (about a second at every start).
            _linear = torch.compiler.disable(_linear)
        self.layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight.requires_grad]
        device = self.layers[0].weight.device
        fused = fused_wgrad_available(device, dtype)
        self.masters: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []
        for m in self.layers:
            w16 = torch.empty_like(m.weight, dtype=dtype)
            b16 = torch.empty_like(m.bias, dtype=dtype) if m.bias is not None else None
            m.low, m.fused = (w16, b16), fused
            self.masters += [m.weight] + ([m.bias] if m.bias is not None else [])
            self.copies += [w16] + ([b16] if b16 is not None else [])
        self.fused = fused
        self.nbytes = sum(c.numel() * c.element_size() for c in self.copies)

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the current weights into the copies (in place: CUDA graphs hold their addresses)
        and make sure every gradient buffer exists for the in-place accumulation."""
        for p in self.masters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_copy_(self.copies, self.masters)

    def release(self) -> None:
        """Back to plain autocast (and the memory of the copies freed)."""
        for m in self.layers:
            m.low = None
        self.layers, self.masters, self.copies = [], [], []
