"""Exponential moving average of the weights, updated after every optimizer step.

One `torch._foreach_lerp_` over all parameters per update (on the model's device or in CPU
memory). The decay warms up as min(decay, (1 + t) / (10 + t)) so the average leaves the
initial weights quickly; the update count is part of the state, so a resumed run continues
the same sequence. Under FSDP the parameters are DTensors and so is the average: each rank
keeps and updates the shards of its own parameters; `state_dict` and `weights` leave them as
DTensors for `redheart.dist.gathered` to make whole, `load_state_dict` cuts whole tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from redheart.dist import is_dtensor, shard_like


def _host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU; an FSDP shard (DTensor) as it is, to be gathered whole by the caller."""
    return t.detach() if is_dtensor(t) else t.detach().cpu()


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, device: str | torch.device | None = None):
        self.decay = decay
        self.warmup = warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        self.shadow = [params[n].detach().to(self.device, copy=True).float() for n in self.names]
        if pin:
            self.shadow = [t.pin_memory() for t in self.shadow]
        self.num_updates = 0

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, host_copy: dict[int, torch.Tensor] | None = None) -> None:
        """One EMA step towards the model's weights (or, with `host_copy`, towards the CPU
        copies of them that the swap manager keeps, mapped by id of the GPU parameter)."""
        params = dict(model.named_parameters())
        if host_copy is not None:
            src = [host_copy[id(params[n])] for n in self.names]
        else:
            src = [params[n].detach() for n in self.names]
        if src[0].device != self.device or src[0].dtype != torch.float32:
            src = [s.to(self.device, torch.float32, non_blocking=True) for s in src]
        torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay_at(self.num_updates))
        self.num_updates += 1

    def move_to(self, device: torch.device) -> None:
        self.device = device
        self.shadow = [t.to(device) for t in self.shadow]

    def state_dict(self) -> dict:
        return {"shadow": {n: _host(t).clone() for n, t in zip(self.names, self.shadow)},
                "num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: keys differ {sorted(missing)[:5]}")
        for t, n in zip(self.shadow, self.names):
            t.copy_(shard_like(state["shadow"][n], t))
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average anew from the model's weights (a warm start from a snapshot)."""
        params = dict(model.named_parameters())
        for t, n in zip(self.shadow, self.names):
            t.copy_(params[n])
        self.num_updates = 0

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights as a (CPU) state dict of the trainable parameters."""
        return {n: _host(t) for n, t in zip(self.names, self.shadow)}

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into the model (e.g. to validate them)."""
        params = dict(model.named_parameters())
        backup = [params[n].detach().clone() for n in self.names]
        with torch.no_grad():
            for n, t in zip(self.names, self.shadow):
                params[n].copy_(t, non_blocking=True)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, b in zip(self.names, backup):
                    params[n].copy_(b)
