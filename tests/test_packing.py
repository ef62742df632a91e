"""Sequence packing (`train.packing`): texts end to end in rows (attention in the padded layout)
give the padded layout's outputs, gradients and trained weights, in fewer rows."""
from __future__ import annotations

import random

import pytest
import torch

from helpers import mixed_lengths_data, newest_state, run, tiny_config
from redheart.config import ConfigError, build_config, preset
from redheart.model.network import RedHeartNet
from redheart.model.packing import first_fit, plan
from redheart.train.plan import use_cuda_graphs, use_packing, use_varlen_attention

CPU = torch.device("cpu")


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_puts_every_text_in_one_row_within_the_width(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(200, 256)]) for _ in range(rng.randint(1, 70))]
    rows = first_fit(lengths, max(lengths))
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max(lengths) for r in rows)
    assert rows == first_fit(lengths, max(lengths))  # a pure function of the lengths
    if len(lengths) > 2 and max(lengths) >= 200 and sum(n < 13 for n in lengths) >= 2:
        assert len(rows) < len(lengths)  # short texts share rows


@pytest.mark.parametrize("seed", range(3))
def test_the_plan_maps_slots_to_distinct_positions_covering_every_token(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(40, 64)]) for _ in range(40)]
    p = plan(lengths, CPU)
    width = max(lengths)
    index = p.index.tolist()
    assert len(index) == p.rows * width == len(set(index))  # distinct: collision-free gathers
    tokens = {i * width + t for i, n in enumerate(lengths) for t in range(n)}
    assert tokens <= set(index) and all(0 <= x < len(lengths) * width for x in index)
    x = torch.randn(len(lengths), width, 3)
    assert torch.equal(p.unpack(p.pack(x)).view(-1, 3)[sorted(tokens)], x.view(-1, 3)[sorted(tokens)])


@pytest.mark.parametrize("seed", range(3))
def test_rows_made_up_for_cuda_graphs_add_empty_rows_only(seed):
    """For CUDA graphs: a wider padded layout and rows made up to a multiple; every token still
    lands once, the slots stay distinct, and the made-up rows hold padding positions only."""
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(40, 60)]) for _ in range(rng.randint(3, 40))]
    exact = plan(lengths, CPU, width=64)
    p = plan(lengths, CPU, width=64, rows_multiple=4)
    n = len(first_fit(lengths, 64))
    assert p.rows == min(len(lengths), -(-n // 4) * 4) and p.width == 64
    assert exact is None or exact.rows == n
    index = p.index.tolist()
    assert len(index) == p.rows * 64 == len(set(index))
    tokens = {i * 64 + t for i, m in enumerate(lengths) for t in range(m)}
    assert tokens <= set(index[:n * 64]) and all(0 <= x < len(lengths) * 64 for x in index)
    x = torch.randn(len(lengths), 64, 3)
    assert torch.equal(p.unpack(p.pack(x)).view(-1, 3)[sorted(tokens)], x.view(-1, 3)[sorted(tokens)])
    assert plan([7, 7, 7], CPU, rows_multiple=2).rows == 3  # always a plan, never more rows than texts


@pytest.mark.parametrize("rows_multiple", [0, 4])
@pytest.mark.parametrize("seed", range(3))
def test_segments_hold_each_text_alone_and_the_free_slots_apart(seed, rows_multiple):
    """Variable-length attention attends within segments: each text must be exactly one segment
    (else texts would see each other or lose part of themselves), and every other slot must lie
    in a segment of free slots only (else the kernel would leave it unwritten)."""
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(40, 64)]) for _ in range(rng.randint(3, 40))]
    p = plan(lengths, CPU, width=64, rows_multiple=rows_multiple, segments=True)
    if p is None:
        return
    cu = p.cu.tolist()
    assert p.cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == p.rows * 64
    assert all(a < b for a, b in zip(cu, cu[1:]))
    assert all(any(a == r * 64 for a in cu) for r in range(p.rows))  # no segment crosses a row
    slot_text = {}
    for text, n in enumerate(lengths):
        for t in range(n):
            slot_text[p.index.tolist().index(text * 64 + t)] = text
    texts_seen = set()
    for a, b in zip(cu, cu[1:]):
        owners = {slot_text.get(s) for s in range(a, b)}
        assert len(owners) == 1, (a, b, owners)  # one text, or free slots only
        (owner,) = owners
        if owner is not None:
            assert b - a == lengths[owner] and owner not in texts_seen
            texts_seen.add(owner)
    assert texts_seen == set(range(len(lengths)))
    assert plan(lengths, CPU, width=64, rows_multiple=rows_multiple) is None or \
        plan(lengths, CPU, width=64, rows_multiple=rows_multiple).cu is None  # only when asked for


def test_nothing_to_pack_keeps_the_padded_layout():
    assert plan([7, 7, 7], CPU) is None
    assert plan([5], CPU) is None
    assert plan([9, 5, 3], CPU).rows == 2  # 5 + 3 share a row of 9


def _inputs(lengths: list[int], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), max(lengths), dim, generator=torch.Generator().manual_seed(3))
    return x * keep[..., None], keep


def test_packed_outputs_and_gradients_equal_the_padded():
    cfg = preset("tiny")
    cfg.model.dropout = 0.0
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model)
    lengths = [30, 5, 17, 30, 2, 11, 8, 25, 1, 3]
    x, keep = _inputs(lengths, cfg.model.encoder_dim)
    packing = plan(lengths, CPU)
    assert packing.rows == 5 < len(lengths)
    grads = []
    outs = []
    for p in (None, packing):
        net.zero_grad()
        out = net(x, keep, True, p)
        sum((v.float() * torch.linspace(0.5, 2, v.numel()).view(v.shape)).sum() for v in out.values()).backward()
        outs.append(out)
        grads.append({n: q.grad.clone() for n, q in net.named_parameters()})
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6), k
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
    with pytest.raises(ValueError, match="padded to 30 tokens, got 31"):
        net(torch.nn.functional.pad(x, (0, 0, 0, 1)), torch.nn.functional.pad(keep, (0, 1)), True, packing)


def test_training_with_packing_ends_at_the_padded_runs_weights(tmp_path, write_file):
    """Two epochs of the tiny preset in fp32 with micro-batches of 16 texts of very different
    lengths, R-Drop's doubled batch included (dropout off so both runs compute the same
    function): the weights agree to float rounding, and differ from it (0 would mean the
    packed path never ran)."""
    common = {"train.epochs": 2, "data.paths": [mixed_lengths_data(write_file)], "crossover.enabled": False,
              "model.dropout": 0.0, "train.micro_batch": 16, "train.grad_accum": 1}
    states = {}
    for mode in ("on", "off"):
        assert run(tiny_config(tmp_path / mode, **common, **{"train.packing": mode}), analysis=False) == 0
        states[mode] = newest_state(tmp_path / mode)
    a, b = states["on"]["model_state"], states["off"]["model_state"]
    diff = max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)
    assert 0 < diff < 1e-4, diff
    for x, y in zip(states["on"]["history"], states["off"]["history"]):
        assert abs(x["val"]["loss"] - y["val"]["loss"]) < 1e-5 * abs(x["val"]["loss"])


def test_packed_attention_is_varlen_only_where_flash_attention_runs():
    cfg = preset("730m")
    assert cfg.train.packed_attention == "auto"
    assert not use_varlen_attention(cfg, CPU, torch.bfloat16, graphs=False)  # no FlashAttention on a CPU
    cfg.train.packed_attention = "varlen"
    with pytest.raises(ConfigError, match="train.packed_attention=varlen: .* here cpu, bfloat16"):
        use_varlen_attention(cfg, CPU, torch.bfloat16, graphs=False)
    cfg.train.packed_attention = "auto"
    assert not use_varlen_attention(cfg, CPU, torch.bfloat16, graphs=True)  # graphs replay the padded attention
    # asked for varlen at a small micro-batch: no CUDA graphs by default; both asked for: refused
    gpu = torch.device("cuda", 0)
    cfg.train.micro_batch, cfg.train.packing = 2, "on"
    assert use_cuda_graphs(cfg, gpu)
    cfg.train.packed_attention = "varlen"
    assert not use_cuda_graphs(cfg, gpu)
    with pytest.raises(ConfigError, match="train.packed_attention: varlen is not replayed by CUDA graphs"):
        build_config("tiny", assignments=["train.packed_attention=varlen", "train.cuda_graphs=on"])


def test_auto_the_default_packs_large_micro_batches_only():
    cfg = preset("730m")
    assert cfg.train.packing == "auto"
    assert not use_packing(cfg)  # the guide's micro-batch 2: CUDA graphs, fixed shapes
    cfg.train.micro_batch = 64
    assert use_packing(cfg)
    cfg.train.packing = "off"
    assert not use_packing(cfg)
    cfg.train.micro_batch, cfg.train.packing = 2, "on"
    assert use_packing(cfg)
