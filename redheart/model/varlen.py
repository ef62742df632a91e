"""Attention over packed rows with FlashAttention's variable-length kernels, dropout included.

Packed (redheart/model/packing.py), a row holds several texts end to end. The padded way to
attend is to scatter the rows back into one row per text (every text as wide as the longest),
attend with a key-padding mask and gather again: on the public corpus most of that attention is
padding, and the scatter and gather move every layer's activations twice. FlashAttention's
variable-length kernels attend within segments of the flat token list instead: each text is a
segment, and so is each row's unused tail (its slots then hold finite values, never read by a
text). PyTorch's own `torch.nn.attention.varlen.varlen_attn` has no dropout; the ATen kernels it
calls do, so this is the same wrapping (a custom op with a fake implementation, so that
`torch.compile` keeps it whole, and a backward that replays the forward's dropout mask from its
random-number state) with the dropout probability passed through.

GPU only (FlashAttention: compute capability 8.0 or newer, fp16 or bf16); elsewhere the
network attends in the padded layout.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("redheart::varlen_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
             dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, rng_state, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, dropout_p, False, False)
    return out, lse, rng_state


@_forward.register_fake
def _(q, k, v, cu, max_len, dropout_p):
    return (torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            q.new_empty((2,), dtype=torch.uint64))


@torch.library.custom_op("redheart::varlen_attention_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, cu: torch.Tensor, max_len: int, dropout_p: float,
                 rng_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad, q, k, v, out, lse, cu, cu, max_len, max_len, dropout_p, False, rng_state, unused)
    return dq, dk, dv


@_backward_op.register_fake
def _(grad, q, k, v, out, lse, cu, max_len, dropout_p, rng_state):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu, max_len, dropout_p = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, cu, rng_state)
    ctx.max_len, ctx.dropout_p = max_len, dropout_p


def _backward(ctx, grad, _grad_lse, _grad_rng):
    q, k, v, out, lse, cu, rng_state = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.dropout_p, rng_state)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention within the segments `cu` (int32 offsets, 0 first, the token count last) of
    (tokens, heads, head_dim) inputs, each with unit stride in its last dimension (slices of one
    fused projection do); `max_len` bounds a segment's length."""
    return _forward(q, k, v, cu, max_len, dropout_p)[0]


def available(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether FlashAttention's kernels run here for activations of this dtype."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device) >= (8, 0))
