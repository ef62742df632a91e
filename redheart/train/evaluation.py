"""Evaluation: a model's predictions for a whole split (`predict_split`), and the split's
metrics from them (`validation`: also the heads whose predictions collapsed). Used by the
loop at every epoch's end, by the LR sweep and by the analysis after training."""
from __future__ import annotations

import torch

from redheart import heads
from redheart.config import Config
from redheart.data.features import FeatureSource
from redheart.dist import World, gather_rows, is_fsdp
from redheart.model.network import head_values
from redheart.train.metrics import collapsed_heads, head_metrics


@torch.no_grad()
def predict_split(model: torch.nn.Module, source: FeatureSource, batch_size: int,
                  dtype: torch.dtype | None, world: World | None = None) -> dict[str, torch.Tensor]:
    """Predictions for a whole split, in the split's order, on the CPU (model left in eval
    mode): each head's `Head.prediction` (the distributions' logits, the [0, 1] values: `head_values`).

    Under several processes each rank predicts every world-th text (by length order, so the
    shares cost alike) and the rows are gathered: every rank gets the same full result. Under
    FSDP every forward gathers each layer's weights from all ranks, so every rank runs as many
    batches as rank 0 (which has the most texts); a rank short of texts runs the first text
    again and drops the output.
    """
    world = world or World()
    model.eval()
    n = len(source.data)
    order = sorted(range(n), key=lambda i: (-int(source.data.lengths[i]), i))[world.rank::world.size]
    fsdp = is_fsdp(model)
    outs: dict[str, list[torch.Tensor]] = {}
    for s in range(0, -(-n // world.size) if fsdp else len(order), batch_size):
        idx = order[s:s + batch_size]
        states, batch = source(idx or [0])
        with torch.autocast(states.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = head_values(model(states, batch.keep.to(states.device, non_blocking=True), batch.padded))
        for k, v in out.items():
            if idx:
                outs.setdefault(k, []).append(v.float().cpu())
    if fsdp:  # FSDP keeps the root's gathered weights after a forward (for the backward): free them
        model.reshard()
    if outs:
        local = {k: torch.cat(v) for k, v in outs.items()}
    else:  # more ranks than texts: this rank contributes no rows
        local = {h.name: torch.zeros(h.shape(0)) for h in heads.HEADS}
    local["index"] = torch.tensor(order, dtype=torch.long)
    rows = gather_rows(local, world)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[rows.pop("index")] = torch.arange(n)
    return {k: v[inverse] for k, v in rows.items()}


def evaluate(model: torch.nn.Module, source: FeatureSource, cfg: Config, dtype: torch.dtype | None,
             world: World | None = None) -> dict[str, float]:
    return validation(model, source, cfg, dtype, world)[0]


def validation(model: torch.nn.Module, source: FeatureSource, cfg: Config, dtype: torch.dtype | None,
               world: World | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The split's metrics, and the heads whose predictions have collapsed (`collapsed_heads`)."""
    pred = predict_split(model, source, cfg.train.eval_batch, dtype, world)
    tgt = source.data.targets(torch.arange(len(source.data)))
    return head_metrics(pred, tgt, cfg.train.head_weights), collapsed_heads(pred, tgt)
