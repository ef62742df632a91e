"""Splits, tensors of targets and masks, the batching plan and collation.

The unit of work is the optimizer step: each epoch's plan is a list of steps, each a list of
sample indices (the effective batch). A step is cut into micro-batches only when it runs, so
changing the micro-batch (by hand or after an out-of-memory error) keeps the same samples
in the same step and the same loss normalisation.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from redheart import heads
from redheart.data.schema import Record

SPLITS = ("train", "val", "test")


def split_key(record_id: str) -> str:
    """Ids that differ only after '#' (translations of one text) share a split."""
    return record_id.split("#", 1)[0]


def hash_unit(key: str, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) for a key."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(record_id: str, train_frac: float = 0.8, val_frac: float = 0.1) -> str:
    u = hash_unit(split_key(record_id), "split")
    return "train" if u < train_frac else "val" if u < train_frac + val_frac else "test"


def split_records(records: list[Record], train_frac: float, val_frac: float) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in records:
        out[split_of(r.id, train_frac, val_frac)].append(r)
    return out


def take_slice(records: list[Record], n: int) -> list[Record]:
    """A stable slice of n records (those of lowest id hash), kept in input order; the slice for
    n is contained in the slice for any larger n, and it mixes all sources."""
    if n <= 0 or n >= len(records):
        return list(records)
    chosen = set(sorted(range(len(records)), key=lambda i: hash_unit(split_key(records[i].id), "slice"))[:n])
    return [r for i, r in enumerate(records) if i in chosen]


def vote_weights(votes: torch.Tensor, overdispersion: float) -> torch.Tensor:
    """Per-record weight of the regret and Bentham losses from the number of votes each share
    comes from (0: not a vote share, weight 1). A share of n votes is n Bernoulli outcomes: its
    binomial log-likelihood is n times the binary cross-entropy, but posts' shares vary more than
    a binomial says (a beta-binomial with intra-post correlation rho), which caps what n votes
    are worth at n / (1 + (n - 1) rho). Divided by its mean over the records with votes, so the
    loss keeps its scale; overdispersion 1 weighs every record alike."""
    w = torch.ones_like(votes, dtype=torch.float32)
    has = votes > 0
    if has.any():
        n = votes[has].float()
        info = n / (1 + (n - 1) * overdispersion)
        w[has] = info / info.mean()
    return w


class TaskData:
    """One split as tensors: token ids and lengths, and per head (redheart/heads.py) its targets
    and their mask, as the attributes `{head}` and `{head}_mask`."""

    def __init__(self, records: list[Record], token_ids: list[list[int]]):
        n = len(records)
        self.records = records
        self.ids = [r.id for r in records]
        self.token_ids = token_ids
        self.lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
        self.head_names = heads.names()
        for h in heads.HEADS:
            rows = [h.target(getattr(r, h.name, None)) for r in records]
            setattr(self, h.name, torch.tensor([v for v, _ in rows], dtype=torch.float32).reshape(h.shape(n)))
            setattr(self, f"{h.name}_mask", torch.tensor([m for _, m in rows], dtype=torch.bool).reshape(h.mask_shape(n)))
        self.votes = torch.tensor([float(r.votes or 0) for r in records])  # 0: not vote shares
        self.weight = torch.ones(n)  # of the losses of the heads weighed by votes (`vote_weights`)

    def __len__(self) -> int:
        return len(self.records)

    def targets(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for h in self.head_names:
            out[h] = getattr(self, h)[idx]
            out[f"{h}_mask"] = getattr(self, f"{h}_mask")[idx]
        out["weight"] = self.weight[idx]
        return out

    def head_counts(self, idx: list[int] | None = None) -> dict[str, int]:
        """Labelled items per head (a `values` head: labelled elements) among the given samples."""
        sel = slice(None) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        return {h: int(getattr(self, f"{h}_mask")[sel].sum()) for h in self.head_names}


def epoch_plan(lengths: torch.Tensor, effective_batch: int, seed: int, epoch: int,
               group_steps: int) -> list[list[int]]:
    """The optimizer steps of one epoch (lists of sample indices), a pure function of its inputs.

    With `group_steps > 0`, each run of `group_steps` steps draws its samples from one chunk
    sorted by length, so a step holds texts of similar length (little padding); the order of
    the steps is then shuffled so lengths do not drift through the epoch.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if group_steps > 0:
        chunk = effective_batch * group_steps
        parts = []
        for s in range(0, n, chunk):
            ids = perm[s:s + chunk]
            parts.append(ids[torch.argsort(lengths[ids], descending=True, stable=True)])
        perm = torch.cat(parts) if parts else perm
    steps = [perm[s:s + effective_batch].tolist() for s in range(0, n, effective_batch)]
    if group_steps > 0 and len(steps) > 1:
        order = torch.randperm(len(steps), generator=g).tolist()
        steps = [steps[i] for i in order]
    return steps


def micro_batches(step: list[int], lengths: torch.Tensor, micro_batch: int, token_budget: int = 0) -> list[list[int]]:
    """Cut one step into micro-batches of similar length (longest first).

    With `token_budget > 0` a micro-batch holds up to `micro_batch` samples as long as its
    padded size (samples x longest) stays within the budget: short texts then travel many to
    a micro-batch and long ones few, so padding costs little at any micro-batch size.
    """
    order = sorted(step, key=lambda i: (-int(lengths[i]), i))
    if token_budget <= 0:
        return [order[s:s + micro_batch] for s in range(0, len(order), micro_batch)]
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < micro_batch and (len(out[-1]) + 1) * int(lengths[out[-1][0]]) <= token_budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def shard(step: list[int], rank: int, world: int, lengths: torch.Tensor | None = None, micro_batch: int = 1,
          token_budget: int = 0, cost: Callable[[list[int]], float] | None = None) -> list[int]:
    """This rank's share of a step's samples (`shares`)."""
    return shares(step, world, lengths, micro_batch, token_budget, cost)[rank]


def shares(step: list[int], world: int, lengths: torch.Tensor | None = None, micro_batch: int = 1,
           token_budget: int = 0, cost: Callable[[list[int]], float] | None = None) -> list[list[int]]:
    """Every rank's share of a step's samples: disjoint parts that cost alike.

    The slowest rank sets the pace of every step, so the shares are balanced. The step is cut
    into micro-batches as one process would cut it (`micro_batches` with `micro_batch` and
    `token_budget`), and these are dealt out (`deal`): every rank gets as many (within one) and
    the ranks' summed `cost` of a micro-batch (default: its padded tokens) is made as even as it
    can be. Cutting a rank's share again with the same `micro_batch` and `token_budget` gives
    back exactly the micro-batches it was dealt (they are runs of one length order, and where a
    cut falls depends only on a micro-batch's count and its first length). Where that leaves
    the costliest rank more than dealing the texts one by one in snake order of length (every
    rank the same spread of lengths, cut into micro-batches by itself) would, or where the step
    holds fewer micro-batches than ranks, the texts are dealt in snake order. Without lengths:
    every world-th sample.
    """
    if world == 1:
        return [list(step)]
    if lengths is None:
        return [step[r::world] for r in range(world)]
    groups = micro_batches(step, lengths, micro_batch, token_budget)
    order = [i for g in groups for i in g]  # by length
    snake = snake_order(order, world)
    if len(groups) < world:
        return snake
    price = cost if cost is not None else (lambda g: len(g) * int(lengths[g[0]]))
    costs = [price(g) for g in groups]
    bins = deal(costs, world)
    if (max(sum(costs[k] for k in b) for b in bins)
            > max(sum(map(price, micro_batches(s, lengths, micro_batch, token_budget))) for s in snake)):
        return snake
    return [[i for k in sorted(b) for i in groups[k]] for b in bins]


def snake_order(order: list[int], world: int) -> list[list[int]]:
    """`order` dealt one by one to `world` ranks in snake order (0, 1, .., N-1, N-1, .., 0, 0, ..)."""
    return [[i for k, i in enumerate(order) if (k % world if (k // world) % 2 == 0 else world - 1 - k % world) == r]
            for r in range(world)]


def deal(costs: list[float], world: int) -> list[list[int]]:
    """Items (by index) to `world` bins of equal counts (within one) whose summed costs are
    close: each item, costliest first, to the cheapest bin with room, then the swap of one item
    between the costliest bin and another that evens them most, while one still does. Each swap
    lowers the sum of the squared totals, so this ends; a pure function of its inputs."""
    room = -(-len(costs) // world)
    bins: list[list[int]] = [[] for _ in range(world)]
    total = [0.0] * world
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min((r for r in range(world) if len(bins[r]) < room), key=lambda r: (total[r], r))
        bins[r].append(k)
        total[r] += costs[k]
    while True:
        hi = max(range(world), key=lambda r: (total[r], -r))
        best = None  # (how uneven the pair ends, other bin, item of hi's, item of the other's)
        for lo in range(world):
            gap = total[hi] - total[lo]
            for a in bins[hi] if lo != hi else ():
                for b in bins[lo]:
                    d = costs[a] - costs[b]
                    if 0 < d < gap and (best is None or abs(gap - 2 * d) < best[0]):
                        best = (abs(gap - 2 * d), lo, a, b)
        if best is None:
            return bins
        _, lo, a, b = best
        bins[hi][bins[hi].index(a)], bins[lo][bins[lo].index(b)] = b, a
        d = costs[a] - costs[b]
        total[hi] -= d
        total[lo] += d


@dataclass
class Batch:
    index: torch.Tensor  # sample indices into the split
    input_ids: torch.Tensor  # (B, L) padded token ids
    keep: torch.Tensor  # (B, L) True for real tokens
    padded: bool  # any padding at all (decided on the host)
    targets: dict[str, torch.Tensor]
    tokens: int  # real tokens in the batch


def collate(data: TaskData, idx: list[int], pad_id: int) -> Batch:
    index = torch.as_tensor(idx, dtype=torch.long)
    lens = [len(data.token_ids[i]) for i in idx]
    width = max(lens)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    keep = torch.zeros(len(idx), width, dtype=torch.bool)
    for row, i in enumerate(idx):
        t = data.token_ids[i]
        ids[row, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        keep[row, : len(t)] = True
    return Batch(index=index, input_ids=ids, keep=keep, padded=min(lens) != width,
                 targets=data.targets(index), tokens=sum(lens))
