"""Issue 24: the Dynamic Swap Manager on a GPU turned every step after the first non-finite.

`Update.apply_update` hands the grad-norm clip to a fused AdamW as `optimizer.grad_scale`, a
0-dim tensor on the model's device. `SwapAdamW` is a fused AdamW over CPU master weights, so
torch's `_fused_adam` brings that tensor to the CPU itself, with `.to("cpu", non_blocking=True)`:
from a CUDA tensor that is an asynchronous copy into newly allocated pinned memory, and the CPU
kernel reads it at once, before the copy has landed (PyTorch's own guide: "cuda_tensor.to("cpu",
non_blocking=True).mean() will produce garbage"). Fresh pinned memory holds zeros: gradients / 0,
AdamW's moments Inf, the weights NaN after the first update; every later step is non-finite and
the run stops (exit 5). The swap manager and activation checkpointing came on together (the
estimate), but only the former matters; compile, packing and varlen attention do not.

On a CPU machine the tensor is on the CPU already, so these tests make the trainer's grad norm
behave as a CUDA result does for the host: its device says cuda, a `.to(..., non_blocking=True)`
gives what the host reads before the copy lands (zeros), a blocking copy gives the value. The
same on a GPU: the script attached to issue 24 (parts A to C).
"""
from __future__ import annotations

import math

import torch

from helpers import newest_state, read_log, run, same_tensors, tiny_config

# the issue's configuration at the tiny preset's size: one micro-batch a step (packed: more than 8
# texts), compiled layers, activation checkpointing, bf16 autocast, R-Drop and EMA (defaults)
ISSUE = dict(data__max_records=60, train__epochs=1, train__micro_batch=16, train__grad_accum=1,
             train__compile=True, model__activation_checkpointing=True, train__packing="on",
             train__precision="bf16", memory__swap="on", crossover__enabled=False)


class _GpuResult(torch.Tensor):
    """A tensor computed on a GPU, as the host sees it: its device is cuda; a blocking copy to the
    host gives its value, a non-blocking one gives what the newly allocated pinned memory holds
    until the copy lands (zeros), which is what the host reads if it does not wait."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch._C.TensorBase.device:  # the `.device` property
            return torch.device("cuda")
        if func is torch.Tensor.to:
            with torch._C.DisableTorchFunctionSubclass():
                host = func(*args, **kwargs).as_subclass(torch.Tensor).clone()
            return torch.zeros_like(host) if kwargs.get("non_blocking") else host
        return super().__torch_function__(func, types, args, kwargs)


def _grad_norm_on_the_gpu(monkeypatch) -> None:
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm",
                        lambda *a, **k: real(*a, **k).as_subclass(_GpuResult))


def test_the_swap_manager_trains_the_issue_configuration_with_the_clip_computed_on_the_gpu(tmp_path, monkeypatch):
    _grad_norm_on_the_gpu(monkeypatch)
    code = run(tiny_config(tmp_path, **ISSUE), analysis=False)
    log = read_log(tmp_path)
    assert "non-finite" not in log
    assert code == 0
    state = newest_state(tmp_path)
    assert state["bad_steps_total"] == 0 and state["global_step"] >= 2
    assert all(torch.isfinite(v).all() for v in state["model_state"].values())
    assert all(math.isfinite(r["val"]["loss"]) for r in state["history"])


def test_the_swap_manager_uses_the_clip_coefficient_computed_on_the_gpu_exactly(tmp_path, monkeypatch):
    """Eager fp32, with a clip that bites: the same weights, moments and EMA bit for bit as the
    run whose grad norm is a CPU tensor."""
    base = dict(data__max_records=60, train__epochs=1, train__grad_accum=4, tech__rdrop_alpha=0.0,
                memory__swap="on", train__clip_norm=0.05, crossover__enabled=False)
    assert run(tiny_config(tmp_path / "host", **base), analysis=False) == 0
    _grad_norm_on_the_gpu(monkeypatch)
    assert run(tiny_config(tmp_path / "gpu", **base), analysis=False) == 0
    a, b = newest_state(tmp_path / "host"), newest_state(tmp_path / "gpu")
    assert a["bad_steps_total"] == b["bad_steps_total"] == 0
    assert same_tensors(a["model_state"], b["model_state"]) == []
    assert same_tensors(a["ema"]["shadow"], b["ema"]["shadow"]) == []
    for k in a["optimizer"]["state"]:
        assert same_tensors(a["optimizer"]["state"][k], b["optimizer"]["state"][k]) == []
