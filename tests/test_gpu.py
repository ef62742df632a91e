"""CUDA graphs of the training micro-step against the eager step, on a GPU (skipped without one;
run them on the device machine: `python3 -m pytest tests/test_gpu.py`).

A graph replays the kernels it captured, with the input buffers' new contents: a packed step
whose row plan (the packing index) were not rewritten before each replay, or whose made-up
rows leaked into the result, would give other losses and gradients than the eager step."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from redheart.config import HEADS, preset
from redheart.model.network import RedHeartNet
from redheart.train.step import GraphedMicroSteps, forward_loss, plan_packing
from redheart.train.plan import compile_blocks

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


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 2e-3) -> None:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) + 1e-12
    assert float((a - b).abs().max()) <= rel * scale, f"{what}: {float((a - b).abs().max())} vs scale {scale}"


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


@pytest.mark.parametrize("rdrop", [0.0, 1.0], ids=["plain", "rdrop"])
def test_graphs_of_a_subset_of_towers_leave_the_others_out(rdrop):
    """A step without SURD targets (the public corpus) replays a graph of the other three towers:
    its losses and gradients are the eager step's with those towers, the SURD tower's gradients
    stay exactly zero although its inverse count and mask are not, and the set of towers is part
    of the graph's key (all four towers capture their own graph)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = preset("tiny")
    cfg.model.dropout, cfg.tech.rdrop_alpha = 0.0, rdrop
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda().train()
    weights = cfg.train.head_weights
    graphs = GraphedMicroSteps(net, cfg.tech, weights, None, cfg.model.max_tokens)
    heads = ["emotion", "bentham", "regret"]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    states, keep, tgt, inv = _micro_batch(BATCHES[0], cfg.model.encoder_dim, 0)
    loss, eager = forward_loss(net, states, keep, True, tgt, inv, cfg.tech, weights, None, heads=heads)
    loss.backward()
    del loss
    expected = _grads(net)
    torch._foreach_zero_([p.grad for p in net.parameters()])
    got = graphs(states, keep, tgt, inv, BATCHES[0], heads)
    assert "surd" not in got and set(got) == set(eager), (sorted(got), sorted(eager))
    for k in eager:
        _close(got[k], eager[k], k)
    for (name, p), e in zip(net.named_parameters(), expected):
        _close(p.grad, e, name)
        if name.startswith("surd."):
            assert not p.grad.any(), name
    torch._foreach_zero_([p.grad for p in net.parameters()])
    every = graphs(states, keep, tgt, inv, BATCHES[0])
    assert "surd" in every and any(p.grad.any() for n, p in net.named_parameters() if n.startswith("surd."))
    assert sorted(k[3] or () for k in graphs.graphs) == [(), tuple(heads)], sorted(graphs.graphs)


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


# Variable-length attention over packed rows (redheart/model/varlen.py)

VARLEN_LENGTHS = [60, 3, 5, 40, 17, 20, 9, 2, 33, 1, 58, 12]


def _max_rel_err(got: dict, ref: dict) -> float:
    return max(float((got[k].float() - ref[k].float()).abs().max() / (ref[k].float().abs().max() + 1e-12))
               for k in ref)


def test_varlen_attention_is_as_accurate_as_the_padded_attention():
    """The network on packed rows with varlen attention against the padded layout in fp32: its
    outputs and gradients are as close as those of packed rows attending in the padded layout
    under the same bf16 autocast. Texts attending across their segment's bounds, or slots the
    kernel left unwritten, would put it orders of magnitude further off."""
    from redheart.model.packing import plan

    cfg = preset("tiny")
    cfg.model.dropout = 0.0
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda()
    states, keep, _, _ = _micro_batch(VARLEN_LENGTHS, cfg.model.encoder_dim, 0)
    dev = states.device

    def run(packing, autocast: bool) -> tuple[dict, dict]:
        net.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = net(states, keep, True, packing)
        weights = torch.Generator().manual_seed(1)
        sum((v.float() * torch.rand(v.shape, generator=weights).to(dev)).sum() for v in out.values()).backward()
        return out, {n: p.grad.clone() for n, p in net.named_parameters()}

    ref_out, ref_grad = run(None, autocast=False)
    padded = plan(VARLEN_LENGTHS, dev)
    segments = plan(VARLEN_LENGTHS, dev, segments=True)
    assert padded.cu is None and segments.cu is not None and segments.rows < len(VARLEN_LENGTHS)
    pad_out, pad_grad = run(padded, autocast=True)
    var_out, var_grad = run(segments, autocast=True)
    e_pad, e_var = _max_rel_err(pad_out, ref_out), _max_rel_err(var_out, ref_out)
    g_pad, g_var = _max_rel_err(pad_grad, ref_grad), _max_rel_err(var_grad, ref_grad)
    assert e_var <= 2 * e_pad + 1e-3 and e_var < 0.05, (e_var, e_pad)
    assert g_var <= 2 * g_pad + 1e-3 and g_var < 0.1, (g_var, g_pad)


def _varlen_inputs(dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 5, 64, 1, 22]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    q, k, v, v2 = (torch.randn(sum(lengths), 4, 32, device="cuda", generator=g, dtype=dtype) for _ in range(4))
    return q, k, v, v2, cu, max(lengths)


def test_varlen_dropout_is_unbiased_and_its_backward_replays_the_forward_mask():
    """Attention with dropout is linear in the values for a fixed mask: with the same seed,
    <g, out(v2) - out(v)> must equal <dL/dv, v2 - v> for L = <g, out(v)>, which holds only if the
    backward drops what the forward dropped. Averaged over many masks the output is the
    dropout-free one (kept weights scaled by 1/(1-p))."""
    from redheart.model.varlen import varlen_attention

    q, k, v, v2, cu, m = _varlen_inputs()
    g = torch.randn(q.shape, device="cuda", dtype=torch.float32, generator=torch.Generator(device="cuda").manual_seed(5))
    v = v.requires_grad_()

    def grad_of_values(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        v.grad = None
        torch.manual_seed(seed)
        out = varlen_attention(q, k, v, cu, m, 0.3)
        (out.float() * g).sum().backward()
        return out.detach(), v.grad.float()

    out, dv = grad_of_values(11)
    torch.manual_seed(11)
    out2 = varlen_attention(q, k, v2, cu, m, 0.3)
    lhs = float((g * (out2.float() - out.float())).sum())
    rhs = float((dv * (v2.float() - v.detach().float())).sum())
    # the same identity with another mask's backward: how far off a backward that redrew is
    other_out, other_dv = grad_of_values(12)
    wrong = float((other_dv * (v2.float() - v.detach().float())).sum())
    assert abs(lhs - rhs) <= 1e-2 * abs(rhs) and abs(lhs - wrong) > 10 * abs(lhs - rhs), (lhs, rhs, wrong)
    assert float((other_out - out).abs().max()) > 0.1  # another seed, another mask
    with torch.no_grad():
        plain = varlen_attention(q, k, v, cu, m, 0.0).float()
        mean = sum(varlen_attention(q, k, v, cu, m, 0.3).float() for _ in range(400)) / 400
    assert float((mean - plain).abs().mean()) < 0.1 * float(plain.abs().mean())
    assert float((out.float() - plain).abs().mean()) > 0.2 * float(plain.abs().mean())  # dropout did apply


@pytest.mark.parametrize("cpp_wrapper", [False, True], ids=["python_wrapper", "cpp_wrapper"])
def test_compiled_varlen_layers_draw_the_masks_and_gradients_of_eager_ones(cpp_wrapper):
    """A compiled layer on packed rows (varlen attention and dropout, compile_blocks, either
    wrapper) against the same layer eager, same seed: same output and same gradients."""
    from redheart.model.packing import plan

    cfg = preset("tiny")
    cfg.model.dropout = 0.3
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda().train()
    block = net.backbone.stack.layers[0]
    p = plan(VARLEN_LENGTHS, torch.device("cuda"), segments=True)
    x = torch.randn(p.rows, p.width, cfg.model.hidden, device="cuda")

    def run(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        block.zero_grad()
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x, None, p.index, p.cu) - x  # the residual branches (x would dwarf them)
        y.float().square().sum().backward()
        return y.detach(), [q.grad.clone() for q in block.parameters()]

    eager, eager_grads = run(7)
    other, other_grads = run(8)
    compile_blocks(net, cpp_wrapper=cpp_wrapper)
    compiled, compiled_grads = run(7)
    # bf16: compiled kernels fuse and round differently; another seed's masks are far off
    _close(compiled.float(), eager.float(), "compiled vs eager output", rel=2e-2)
    assert float((other.float() - eager.float()).abs().max()) > 0.1 * float(eager.float().abs().max())
    for i, (a, b, c) in enumerate(zip(compiled_grads, eager_grads, other_grads)):
        _close(a, b, f"compiled vs eager gradient {i}", rel=2e-2)
        assert float((c - b).abs().max()) > 0.1 * float(b.abs().max()), f"gradient {i} without dropout?"


def test_training_with_varlen_attention_ends_near_the_padded_attentions_run(tmp_path, write_file):
    """Two epochs of the tiny preset on the GPU (bf16, packed micro-batches of 16 texts of mixed
    lengths, dropout off): varlen and padded attention end at validation losses within bf16
    rounding of each other, and the log says which ran."""
    from helpers import mixed_lengths_data, newest_state, read_log, run, tiny_config

    data = mixed_lengths_data(write_file)
    losses, logs = {}, {}
    for mode in ("varlen", "padded"):
        out = tmp_path / mode
        cfg = tiny_config(out, train__epochs=2, train__device="cuda", train__micro_batch=16, train__grad_accum=1,
                          train__packing="on", train__packed_attention=mode, model__dropout=0.0,
                          crossover__enabled=False, data__paths=[data])
        assert run(cfg, analysis=False) == 0
        losses[mode] = [h["val"]["loss"] for h in newest_state(out)["history"]]
        logs[mode] = read_log(out)
    assert "attention within each text's segment of the rows (FlashAttention varlen)" in logs["varlen"]
    assert "attention in the padded layout" in logs["padded"]
    for a, b in zip(losses["varlen"], losses["padded"]):
        assert abs(a - b) <= 0.02 * abs(b), losses


def test_the_native_encoder_on_the_gpu_in_bf16_matches_transformers():
    """The frozen encoder as training runs it on a GPU (bf16, redheart/model/bert.py) against
    transformers' BertModel in bf16: as close as two bf16 computations of one function get,
    and both close to the fp32 states."""
    from redheart.model.encoder import DEFAULT_ENCODER, Encoder, Tokenizer

    texts = ["I lent my car to a friend and he crashed it.", "", "AITA for skipping my sister's wedding?" * 12]
    ids = Tokenizer(DEFAULT_ENCODER, 128)(texts)
    n = max(map(len, ids))
    batch = torch.tensor([x + [0] * (n - len(x)) for x in ids], device="cuda")
    keep = torch.arange(n, device="cuda")[None, :] < torch.tensor([len(x) for x in ids], device="cuda")[:, None]
    ref32 = Encoder(DEFAULT_ENCODER, native=False).to("cuda", torch.float32)(batch, keep).float()
    native = Encoder(DEFAULT_ENCODER).to("cuda", torch.bfloat16)(batch, keep).float()
    hf = Encoder(DEFAULT_ENCODER, native=False).to("cuda", torch.bfloat16)(batch, keep).float()
    m = keep[..., None]
    scale = float(ref32.abs().max())
    err_native, err_hf = float(((native - ref32).abs() * m).max()), float(((hf - ref32).abs() * m).max())
    assert err_native <= 2 * err_hf + 1e-3 * scale and err_native < 0.05 * scale, (err_native, err_hf, scale)


def test_a_training_step_on_the_gpu_never_waits_for_the_gpu(tmp_path, write_file):
    """No host synchronisation inside a step: the host queues a step's work and goes on, the
    finite check read one step later. Step 8 of a tiny run (CUDA graphs; every text has the same
    length, so all graphs are captured in the first steps) runs under the profiler: it has
    kernels, and no stream or device synchronize of 0.5 ms or more (`host_waits`; the profiler's
    own closing one aside). A `.item()`, a blocking copy or a host scalar written into a device
    tensor in the step would show here, with the operation that made it. Allowed: the wait on
    the previous step's end event (`settle`), which keeps a fast host at most a step ahead."""
    import json
    import random

    from helpers import run, tiny_config

    rng = random.Random(0)
    words = "i lent my car to a friend and he crashed it then said nothing for weeks".split()
    recs = [{"id": f"u{i}", "text": " ".join(rng.choice(words) for _ in range(12)),
             "emotion": [1.0 if j == i % 7 else 0.0 for j in range(7)], "bentham": [rng.random() for _ in range(10)],
             "regret": rng.random(), "surd": [0.25] * 4} for i in range(48)]
    data = write_file("same_length.jsonl", recs)
    cfg = tiny_config(tmp_path, train__epochs=2, train__device="cuda", train__grad_accum=4, crossover__enabled=False,
                      train__profile_step=8, data__paths=[str(data)])
    assert run(cfg, analysis=False) == 0
    summary = json.loads((tmp_path / "logs" / "profile_step8_rank0.json").read_text())
    assert summary["kernels"] > 0
    # each replayed micro-batch's kernels found through its cudaGraphLaunch (grad_accum 4: up to 4)
    assert 1 <= sum(m["count"] for m in summary["micro_batches"]) <= 4, summary["micro_batches"]
    assert all(m["gpu_ms"] > 0 and m["kernels"] > 100 for m in summary["micro_batches"]), summary["micro_batches"]
    waits = [w for w in summary["host_waits"] if w["call"] != "cudaEventSynchronize"]
    assert waits == [], summary["host_waits"]


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward first keeps the GPU busy (~10 ms): the rest of that backward
    comes well after anything queued on another stream without waiting for it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        torch.cuda._sleep(20_000_000)
        return grad


def test_a_replayed_graphs_ready_events_pass_only_once_its_backward_has_written_the_bucket():
    """The overlap of the gradient all-reduce with a replayed backward (`GradReadiness`): the
    events a CUDA graph's capture turned into event nodes are recorded by each replay, so a
    stream waiting on bucket k's event after the replay was queued reads bucket k complete. A
    copy made on a stream that waits only for the replay's start reads it unfinished (the
    backbone's backward begins with ~10 ms of sleep): the check can fail. The other micro-batches
    of a step replay graphs of their own, without the events."""
    from redheart.dist import FlatGrads, GradReadiness

    cfg = preset("tiny")
    cfg.model.dropout = 0.0
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda().train()
    named = list(net.named_parameters())
    flat = FlatGrads([p for _, p in named], bucket_bytes=64 * 1024, groups=[n.split(".", 1)[0] for n, _ in named])
    ready = GradReadiness(flat)
    net.backbone.register_forward_hook(lambda module, args, out: _SlowBackward.apply(out))
    graphs = GraphedMicroSteps(net, cfg.tech, cfg.train.head_weights, None, cfg.model.max_tokens, ready=ready)
    lengths = BATCHES[0]
    states, keep, tgt, inv = _micro_batch(lengths, cfg.model.encoder_dim, 0)
    graphs(states, keep, tgt, inv, lengths)  # captured, then replayed once
    assert not ready.untracked  # the capture's gradients were all accumulated on its own stream
    assert sorted(ready.fired) == list(range(len(flat.buckets))) and len(flat.buckets) > 10
    backbone = [k for k in ready.fired if flat.groups[k] == "backbone"]
    comm, control = torch.cuda.Stream(), torch.cuda.Stream()
    snaps = {k: torch.empty_like(b) for k, b in enumerate(flat.buckets)}
    early = {k: torch.empty_like(b) for k, b in enumerate(flat.buckets)}
    for replay in range(3):
        torch.cuda.synchronize()
        flat.flat.zero_()
        start = torch.cuda.Event()
        start.record()
        graphs(states, keep, tgt, inv, lengths)
        for k in ready.fired:
            with torch.cuda.stream(comm):
                comm.wait_event(ready.events[k])
                snaps[k].copy_(flat.buckets[k])
            with torch.cuda.stream(control):
                control.wait_event(start)
                early[k].copy_(flat.buckets[k])
        torch.cuda.synchronize()
        assert flat.flat.abs().sum() > 0
        for k in ready.fired:
            assert torch.equal(snaps[k], flat.buckets[k]), f"replay {replay}: bucket {k} read before its event"
        assert not all(torch.equal(early[k], flat.buckets[k]) for k in backbone)
    graphs(states, keep, tgt, inv, lengths, last=False)  # not a step's last micro-batch: a graph without events
    assert ready.fired == [] and not ready.untracked and len(graphs.graphs) == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("reduce", ["fp32", "bf16"])
def test_two_gpus_overlapping_the_all_reduce_end_at_the_weights_of_summing_after_the_backward(tmp_path, reduce):
    """`--gpus 2` on two GPUs (NCCL, CUDA graphs, bf16 copies, R-Drop and dropout on): each
    bucket's all-reduce started inside the last replayed backward changes every weight as the
    all-reduce after the whole backward does (`train.overlap_grad_reduce=false`), to 1% of the
    largest change in each tensor, and gives the same losses. A bucket summed before its
    gradients were complete would leave out part of a micro-batch from them; in bf16, a sum
    copied back before it had arrived would leave out the other rank's share."""
    from helpers import cli, newest_state

    args = ["unified-train", "--preset", "tiny", "--max-records", "90", "--epochs", "2", "--no-lr-sweep",
            "--gpus", "2", "--device", "cuda", "--set", "train.grad_accum=4",
            "--set", "crossover.enabled=false", "--set", f"train.grad_reduce={reduce}"]
    states = {}
    for on in ("true", "false"):
        out = tmp_path / on
        res = cli(*args, "--output-dir", str(out), "--set", f"train.overlap_grad_reduce={on}", timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        states[on] = newest_state(out)
        logs = "".join(f.read_text() for f in (out / "logs").glob("training_*.log"))
        assert ("overlapped with the backward" in logs and "event nodes in the CUDA graphs" in logs) == (on == "true")
        assert "not overlapped for this backward" not in logs
    a, b = states["true"], states["false"]
    assert a["global_step"] == b["global_step"] > 4
    from redheart.config import Config

    cfg = Config.from_dict(a["config"])
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation, on the GPU as in these runs
    with torch.device("cuda"):
        init = {k: v.cpu() for k, v in RedHeartNet(cfg.model).state_dict().items()}
    moved = 0
    for k in b["model_state"]:  # what training changed, compared: a gradient short of a micro-batch shows
        _close(a["model_state"][k].float() - init[k], b["model_state"][k].float() - init[k], k, rel=1e-2)
        moved += not torch.equal(b["model_state"][k], init[k])
    assert moved > len(init) // 2
    for ra, rb in zip(a["history"], b["history"]):
        assert abs(ra["train"]["loss"] - rb["train"]["loss"]) < 1e-3 * abs(rb["train"]["loss"])


def test_capturing_a_graph_leaves_the_random_stream_as_it_found_it():
    """A capture's random input and warm-ups draw from the GPU's random stream; it is put back,
    so the dropout masks of training do not depend on when graphs are captured: a micro-batch
    whose graph is captured on the spot draws the masks (and gives the losses) of one whose
    graph already exists, and leaves the stream where that one does."""
    cfg = preset("tiny")
    assert cfg.model.dropout > 0 and cfg.tech.rdrop_alpha > 0
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).cuda().train()
    graphs = GraphedMicroSteps(net, cfg.tech, cfg.train.head_weights, None, cfg.model.max_tokens)
    lengths = BATCHES[0]
    states, keep, tgt, inv = _micro_batch(lengths, cfg.model.encoder_dim, 0)
    start = torch.cuda.get_rng_state()
    first = graphs(states, keep, tgt, inv, lengths)  # captured, then replayed
    after_first = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(start)
    again = graphs(states, keep, tgt, inv, lengths)  # replayed only
    assert len(graphs.graphs) == 1
    assert torch.equal(torch.cuda.get_rng_state(), after_first) and not torch.equal(after_first, start)
    for k in first:
        assert torch.equal(first[k], again[k]), k
    third = graphs(states, keep, tgt, inv, lengths)  # the stream has moved on: other masks
    assert not torch.equal(third["loss"], first["loss"])


def test_a_gpu_run_stopped_and_resumed_ends_where_the_straight_run_does(tmp_path):
    """Exact resume on the GPU (CUDA graphs, dropout and R-Drop on): the resumed process
    captures its graphs again, which leaves the dropout stream untouched, so it ends at the
    straight run's weights, EMA and losses (to float rounding of the GPU's kernels)."""
    from helpers import straight_and_resumed

    straight, resumed = straight_and_resumed(tmp_path, data__max_records=80, train__epochs=3, train__grad_accum=4,
                                             train__save_every=1, train__device="cuda", crossover__enabled=False)
    for k in straight["model_state"]:
        _close(resumed["model_state"][k].float(), straight["model_state"][k].float(), k, rel=1e-4)
        _close(resumed["ema"]["shadow"][k].float(), straight["ema"]["shadow"][k].float(), "ema " + k, rel=1e-4)
    for ra, rb in zip(resumed["history"], straight["history"]):
        assert abs(ra["val"]["loss"] - rb["val"]["loss"]) < 1e-4 * abs(rb["val"]["loss"])


def _twenty_steps(tmp_path, swap: bool) -> list[float]:
    """20 optimizer steps of the tiny preset at micro-batch 64 x 1, compiled, packed (varlen
    attention), bf16, R-Drop and EMA on the sample data, with the swap manager (and activation
    checkpointing, as the planner turns on with it) or without; the loss of each step."""
    from pathlib import Path

    from redheart.ckpt.state import RunPaths
    from redheart.data.dataset import epoch_plan
    from redheart.session import build_session
    from redheart.train.trainer import Trainer

    from helpers import tiny_config

    cfg = tiny_config(tmp_path / ("swap" if swap else "plain"), train__micro_batch=64, train__grad_accum=1,
                      train__compile=True, train__device="cuda", memory__swap="on" if swap else "off",
                      model__activation_checkpointing=swap)
    session = build_session(cfg)
    trainer = Trainer(cfg, RunPaths(Path(cfg.output_dir), "t"), session.data, session.features, session.device)
    assert trainer.swap == swap and trainer.plan.packing and trainer.plan.varlen_attention and trainer.checkpointing == swap
    lengths = session.data.splits["train"].lengths
    plan = [s for e in range(1, 9) for s in epoch_plan(lengths, 64, cfg.train.seed, e, 0)][:20]
    losses = []
    for step in plan:
        trainer.model.train()
        parts = trainer.accumulate(step)
        assert trainer.optimizer_step(parts) is not False
        trainer.settle()
        losses.append(float(parts["loss"]))
    assert trainer.update.bad_steps_total == 0
    return losses


def test_the_swap_manager_at_micro_batch_64_compiled_and_packed_trains_as_without_it(tmp_path):
    """Issue 24: under the swap manager every step after the first was non-finite (its CPU AdamW
    read the GPU's clip coefficient before the copy landed). Its first 20 steps now match the
    unswapped run's within bf16 noise (the same dropout masks: checkpointing replays them)."""
    plain, swapped = _twenty_steps(tmp_path, False), _twenty_steps(tmp_path, True)
    assert all(math.isfinite(x) for x in plain + swapped)
    rel = max(abs(a - b) / abs(a) for a, b in zip(plain, swapped))
    assert rel < 2e-2, (rel, plain, swapped)
    assert plain[-1] < plain[0]  # and it trains


def test_measuring_the_heaviest_micro_batch_on_the_gpu(tmp_path):
    """The planner's measurement where the estimate is near the line: a forward and backward of
    the heaviest micro-batch with the optimizer state in reserve peaks above what the weights and
    the reserve alone take, and below the estimate's total plus a margin."""
    from pathlib import Path

    from redheart.ckpt.state import RunPaths
    from redheart.session import build_session
    from redheart.train import memory
    from redheart.train.plan import measure_heaviest
    from redheart.train.trainer import Trainer

    from helpers import tiny_config

    cfg = tiny_config(tmp_path, train__micro_batch=64, train__grad_accum=1, train__device="cuda")
    session = build_session(cfg)
    trainer = Trainer(cfg, RunPaths(Path(cfg.output_dir), "t"), session.data, session.features, session.device)
    params = trainer.param_counts["total"]
    peak = measure_heaviest(trainer.model, cfg, trainer.features["train"], trainer.train_data, trainer.device, params)
    assert peak is not None and peak * 2**30 > (4 + 8 + 4) * params
    est = memory.estimate(cfg, params, **trainer.memory_profile)
    assert peak < est["total_gib"] + 0.5


def test_a_compiled_gpu_run_under_gnu_timeout_stops_with_a_resumable_state(tmp_path):
    """As bench/full_run.sh stops a long run between device calls: GNU `timeout -s TERM` sends
    SIGTERM to the run and to its process group (Inductor's compile workers too). The run must
    say so, save a resume state as of its last step and resume from it. (On the lent H100 a
    compiled 730m run so stopped left no state and no message, 2026-12-08.)"""
    import subprocess

    from helpers import ROOT, read_log

    out = tmp_path / "run"
    cmd = ["timeout", "-s", "TERM", "90", sys.executable, "-m", "redheart", "unified-train", "--preset", "tiny",
           "--epochs", "500", "--no-lr-sweep", "--batch-size", "64", "--set", "train.compile=true",
           "--set", "train.micro_batch=64", "--set", "train.grad_accum=1", "--output-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=400)
    log = read_log(out)
    assert done.returncode == 124, done.stderr[-3000:]  # timeout's own code: the time ran out
    assert "SIGTERM received" in log, log[-3000:]
    assert list((out / "checkpoints_final").glob("resume_state_*.pt")), log[-3000:]
    cmd[3] = "60"
    again = subprocess.run(cmd + ["--resume", "latest"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert "resumed run" in read_log(out), again.stderr[-3000:]
