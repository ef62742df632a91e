"""bf16 weight copies cast once per optimizer step (`train.bf16_weights`): the gradients and
the trained weights equal plain bf16 autocast's, the copies follow every weight change, and
evaluation never reads them."""
from __future__ import annotations

import torch

from helpers import newest_state, run, tiny_config
from redheart.model import lowp
from redheart.model.lowp import Linear, LowPrecisionCopies, accumulate_wgrad


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Linear(16, 32), torch.nn.GELU(), Linear(32, 8, bias=False))


def _grads_after(net: torch.nn.Module, copies: LowPrecisionCopies | None, steps: int) -> list[torch.Tensor]:
    """`steps` optimizer steps of 3 accumulated micro-batches each, SGD in between."""
    x = torch.randn(3, 4, 5, 16, generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(steps):
        if copies is not None:
            copies.refresh()
        for mb in x:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = net(mb)
            (y.float() ** 2).mean().backward()
        out = [p.grad.clone() for p in net.parameters()]
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.5 * p.grad
                p.grad.zero_()
    return out


def test_gradients_equal_autocast_and_the_copies_follow_each_update():
    plain = _grads_after(_net(), None, steps=3)
    net = _net()
    copies = LowPrecisionCopies(net, torch.bfloat16)
    assert len(copies.layers) == 2 and len(copies.copies) == 3  # two weights and one bias
    # its backward writes .grad in place: torch.compile must leave it out of compiled regions
    assert getattr(lowp._linear, "_torchdynamo_disable", False)
    low = _grads_after(net, copies, steps=3)
    for a, b in zip(plain, low):
        assert b.dtype == torch.float32
        # the bias gradient is summed in fp32 here, in bf16 under autocast: within bf16 rounding
        assert torch.allclose(a, b, rtol=2e-2, atol=1e-5), (a - b).abs().max()
    # a copy left stale after the SGD updates would give the step-3 gradients of step 1
    stale = _grads_after(_net(), None, steps=1)
    assert not torch.allclose(stale[0], low[0], rtol=2e-2, atol=1e-5)


def test_the_fallback_accumulation_adds_the_product():
    g = torch.ones(3, 2)
    gy, x = torch.randn(5, 3).to(torch.bfloat16), torch.randn(5, 2).to(torch.bfloat16)
    accumulate_wgrad(g, gy, x, fused=False)
    assert torch.allclose(g, 1 + gy.float().t() @ x.float(), rtol=1e-2, atol=1e-2)


def test_evaluation_and_released_copies_read_the_fp32_weights():
    net = _net()
    copies = LowPrecisionCopies(net, torch.bfloat16)
    copies.refresh()
    with torch.no_grad():
        net[0].weight.add_(1.0)  # the copy is now stale; only training reads it
    x = torch.randn(2, 16)
    want = torch.nn.functional.linear(x, net[0].weight, net[0].bias)
    net.eval()
    assert torch.equal(net[0](x), want)
    net.train()
    assert not torch.allclose(net[0](x).float(), want, atol=0.1)  # the stale copy, as documented
    copies.release()
    assert torch.equal(net[0](x), want)


def test_training_with_copies_ends_at_the_weights_of_plain_autocast(tmp_path):
    """Two epochs of the tiny preset on the CPU: bf16 autocast with the copies on and off end
    closer to each other than either is to fp32 (the yardstick of bf16 rounding)."""
    common = {"train.epochs": 2, "data.max_records": 50, "crossover.enabled": False, "model.dropout": 0.0,
              "tech.rdrop_alpha": 0.0}
    runs = {"off": {"train.precision": "bf16", "train.bf16_weights": "off"},
            "on": {"train.precision": "bf16", "train.bf16_weights": "on"},
            "fp32": {"train.precision": "fp32"}}
    states = {}
    for name, extra in runs.items():
        assert run(tiny_config(tmp_path / name, **common, **extra), analysis=False) == 0
        states[name] = newest_state(tmp_path / name)

    def mean_abs_diff(x: str, y: str) -> float:
        a, b = states[x]["model_state"], states[y]["model_state"]
        return sum(float((a[k] - b[k]).abs().sum()) for k in a) / sum(v.numel() for v in a.values())

    on_off, bf16_fp32 = mean_abs_diff("on", "off"), mean_abs_diff("off", "fp32")
    assert 0 < on_off < 0.5 * bf16_fp32, (on_off, bf16_fp32)  # 0: the copies were never used
    for x, y in zip(states["off"]["history"], states["on"]["history"]):
        assert abs(x["val"]["loss"] - y["val"]["loss"]) < 1e-4 * abs(x["val"]["loss"])
        assert abs(x["train"]["loss"] - y["train"]["loss"]) < 1e-4 * abs(x["train"]["loss"])


def test_auto_turns_the_copies_on_only_where_they_paid_on_the_gpu():
    from redheart.config import preset
    from redheart.train.plan import use_bf16_weights

    gpu, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16

    def cfg(**train):
        c = preset("730m")
        for k, v in train.items():
            setattr(c.train, k, v)
        return c

    assert use_bf16_weights(cfg(), gpu, bf16, swap=False)  # the guide: micro-batch 2 x 32
    assert not use_bf16_weights(cfg(), gpu, bf16, swap=True)  # memory first
    assert not use_bf16_weights(cfg(), gpu, None, swap=False)  # fp32: nothing to cast
    assert not use_bf16_weights(cfg(), cpu, bf16, swap=False)
    assert not use_bf16_weights(cfg(micro_batch=64, grad_accum=1), gpu, bf16, swap=False)
    assert not use_bf16_weights(cfg(compile=True), gpu, bf16, swap=False)
    assert use_bf16_weights(cfg(bf16_weights="on", compile=True), cpu, bf16, swap=False)
    assert not use_bf16_weights(cfg(bf16_weights="off"), gpu, bf16, swap=False)
