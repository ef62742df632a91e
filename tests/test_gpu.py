"""CUDA graphs of the training micro-step against the eager step, on a GPU (skipped without one;
run them on the device machine: `python3 -m pytest tests/test_gpu.py`).

A graph replays the kernels it captured, with the input buffers' new contents: a packed step
whose row plan (the packing index) were not rewritten before each replay, or whose made-up
rows leaked into the result, would give other losses and gradients than the eager step."""
from __future__ import annotations

import pytest
import torch

from redheart.config import HEADS, preset
from redheart.model.network import RedHeartNet
from redheart.train.step import GraphedMicroSteps, forward_loss, plan_packing
from redheart.train.trainer import compile_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")

# Three micro-batches of 8 texts: the first two pack into the same number of rows in other
# arrangements (so the second replays the first's graph with a new plan), the third into more.
BATCHES = ([60, 3, 5, 40, 17, 20, 9, 2], [50, 14, 4, 25, 33, 6, 12, 41], [61, 50, 45, 40, 35, 33, 7, 6])


def _micro_batch(lengths: list[int], dim: int, seed: int) -> tuple:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(seed)
    n, b = max(lengths), len(lengths)
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    states = torch.randn(b, n, dim, generator=g) * keep[..., None]
    emotion = torch.softmax(torch.randn(b, 7, generator=g), -1)
    tgt = {"emotion": emotion, "bentham": torch.rand(b, 10, generator=g), "regret": torch.rand(b, generator=g),
           "surd": torch.softmax(torch.randn(b, 4, generator=g), -1),
           "emotion_mask": torch.ones(b, dtype=torch.bool), "bentham_mask": torch.rand(b, 10, generator=g) > 0.3,
           "regret_mask": torch.rand(b, generator=g) > 0.3, "surd_mask": torch.ones(b, dtype=torch.bool)}
    inv = torch.full((len(HEADS),), 1.0 / b)
    return states.to(dev), keep.to(dev), {k: v.to(dev) for k, v in tgt.items()}, inv.to(dev)


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) + 1e-12
    assert float((a - b).abs().max()) <= 2e-3 * scale, f"{what}: {float((a - b).abs().max())} vs scale {scale}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("rdrop", [0.0, 1.0], ids=["plain", "rdrop"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_graphed_micro_steps_give_the_eager_steps_losses_and_gradients(packed, rdrop, compiled):
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = preset("tiny")
    cfg.model.dropout, cfg.tech.rdrop_alpha = 0.0, rdrop  # no dropout: both compute one function
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda().train()
    if compiled:
        compile_blocks(net)
    weights = cfg.train.head_weights
    graphs = GraphedMicroSteps(net, cfg.tech, weights, None, cfg.model.max_tokens, rows_multiple=2 if packed else 0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    for seed, lengths in enumerate(BATCHES):
        states, keep, tgt, inv = _micro_batch(lengths, cfg.model.encoder_dim, seed)
        torch._foreach_zero_([p.grad for p in net.parameters()])
        packing = plan_packing(lengths, cfg.tech, states.device) if packed else None
        loss, eager = forward_loss(net, states, keep, True, tgt, inv, cfg.tech, weights, None, packing=packing)
        loss.backward()
        del loss  # its autograd graph holds AccumulateGrad nodes a capture must not meet
        expected = _grads(net)
        torch._foreach_zero_([p.grad for p in net.parameters()])
        got = graphs(states, keep, tgt, inv, lengths)
        for k in eager:
            _close(got[k], eager[k], f"batch {seed}: {k}")
        for i, (a, b) in enumerate(zip(_grads(net), expected)):
            _close(a, b, f"batch {seed}: gradient {i}")
        assert sum(float(g.abs().sum()) for g in expected) > 0
    keys = sorted(graphs.graphs)
    if packed:  # batches 0 and 1 share a graph (same rows), batch 2 has its own
        assert len(keys) == 2 and all(k[2] % 2 == 0 and k[2] > 0 for k in keys), keys
    else:
        assert len(keys) == 1 and keys[0][2] == 0, keys


def test_deferred_finite_checks_on_the_gpu_end_where_synchronous_ones_do(tmp_path):
    """A tiny run on the GPU (CUDA graphs, bf16) with a NaN loss and an Inf gradient: the checks
    left on the device (the default there) skip and count the same steps as synchronous ones,
    and end at the same weights (to float rounding: GPU attention backward is not bit-exact)."""
    from helpers import newest_state, read_log, run, tiny_config

    faults = {"nan_at_steps": [3], "inf_grad_at_steps": [8]}
    states, logs = {}, {}
    for mode in ("sync", "auto"):
        out = tmp_path / mode
        cfg = tiny_config(out, data__max_records=60, train__epochs=2, train__grad_accum=4, train__device="cuda",
                          crossover__enabled=False, train__finite_check=mode)
        assert run(cfg, analysis=False, faults=faults) == 0
        states[mode] = newest_state(out)
        logs[mode] = read_log(out)
    assert "finite checks deferred" in logs["auto"] and "finite checks deferred" not in logs["sync"]
    for log in logs.values():
        assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in all)" in log
        assert "step 8: non-finite loss or gradient, update skipped (1 in a row, 2 in all)" in log
    a, b = states["auto"], states["sync"]
    assert (a["global_step"], a["bad_steps_total"], a["ema"]["num_updates"], a["scheduler"]) == \
        (b["global_step"], b["bad_steps_total"], b["ema"]["num_updates"], b["scheduler"])
    for k in b["model_state"]:
        _close(a["model_state"][k].float(), b["model_state"][k].float(), k)
        _close(a["ema"]["shadow"][k].float(), b["ema"]["shadow"][k].float(), "ema " + k)


def test_compiled_layers_draw_the_dropout_masks_of_eager_ones():
    """`compile_blocks` has Inductor take dropout from ATen's generator (fallback_random): with
    the same seed a compiled layer's training forward equals the eager one's (Inductor's own
    in-kernel random numbers would give other masks)."""
    cfg = preset("tiny")
    cfg.model.dropout = 0.3
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda().train()
    x = torch.randn(4, 16, cfg.model.hidden, device="cuda")
    block = net.backbone.stack.layers[0]
    torch.manual_seed(7)
    eager = block(x, None)
    compile_blocks(net)
    torch.manual_seed(7)
    compiled = block(x, None)
    torch.manual_seed(8)
    other = block(x, None)
    _close(compiled, eager, "compiled vs eager, same seed")
    assert float((other - eager).abs().max()) > 1e-2  # the masks do depend on the seed
