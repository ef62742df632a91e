"""The Dynamic Swap Manager: AdamW whose state and update live in pinned CPU memory.

A 730M-parameter model trained with AdamW needs 16 bytes a parameter for weights, gradients
and the two moments (11.7 GB) before any activation; an 8 GB GPU cannot hold that. Following
ZeRO-Offload's design, the GPU keeps only what forward and backward touch (fp32 weights and
gradients, ~5.4 GiB for 730M), while the fp32 master copy, both moments and the update itself
live in pinned CPU memory: after the last micro-batch the gradients stream to the host in
chunks on a side stream (the CPU update of one chunk overlaps the copy of the next), and
the updated weights stream back the same way.

torchao's CPUOffloadOptimizer does the same from gradient hooks, but it is neither in this
project's pinned environment nor on the target GPU image, and its hooks copy the gradients
after every backward, which gradient accumulation (32 micro-batches a step here) multiplies.

`SwapAdamW` *is* a `torch.optim.AdamW` over the CPU master weights, so its state_dict has the
same format as the GPU optimizer's: a checkpoint resumes with the swap manager on or off.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger("redheart")

CHUNK_BYTES = 64 * 2**20


class SwapAdamW(torch.optim.AdamW):
    def __init__(self, model: nn.Module, groups: list[dict], lr: float, betas: tuple[float, float]):
        self.gpu_params = [p for g in groups for p in g["params"]]
        self.cuda = any(p.is_cuda for p in self.gpu_params)
        cpu_groups = []
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for g in groups:
            cpu = []
            for p in g["params"]:
                c = torch.empty(p.shape, dtype=torch.float32, pin_memory=self.cuda)
                c.copy_(p.detach())
                cpu.append(c)
                self._pairs.append((p, c))
            cpu_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": cpu})
        super().__init__(cpu_groups, lr=lr, betas=betas, fused=True)  # PyTorch's fused CPU kernel
        self._grads = [torch.empty(c.shape, dtype=torch.float32, pin_memory=self.cuda) for _, c in self._pairs]
        self._chunks = _chunks([c.numel() * 4 for _, c in self._pairs])
        self.cpu_of = {id(p): c for p, c in self._pairs}  # GPU parameter -> its CPU master copy
        self.stream = torch.cuda.Stream() if self.cuda else None

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Refill the CPU master weights from the model's, after its weights were loaded (a
        resume, a warm start): the next update must start from them, not from the weights
        the manager was built with."""
        for gpu, cpu in self._pairs:
            cpu.copy_(gpu.detach())

    @property
    def cpu_params(self) -> list[torch.Tensor]:
        return [c for _, c in self._pairs]

    def _on_side_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    @torch.no_grad()
    def step(self, closure=None):
        """Gradients to the host, AdamW on the CPU, weights back, chunk by chunk, overlapped."""
        # The trainer hands its clip coefficient over as `grad_scale` (GradScaler's mechanism, as
        # `found_inf` may be), a tensor on the model's device. torch's fused AdamW would move it to
        # the CPU with non_blocking=True: a device-to-host copy into new pinned memory that its CPU
        # kernel reads before the copy lands (zeros: gradients / 0, NaN weights). Wait for it here.
        for name in ("grad_scale", "found_inf"):
            t = getattr(self, name, None)
            if t is not None and t.device.type != "cpu":
                setattr(self, name, t.to("cpu"))
        events = []
        with self._on_side_stream():
            if self.cuda:
                self.stream.wait_stream(torch.cuda.current_stream())
            for lo, hi in self._chunks:
                for i in range(lo, hi):
                    g = self._pairs[i][0].grad
                    if g is not None:
                        self._grads[i].copy_(g, non_blocking=self.cuda)
                if self.cuda:
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    events.append(ev)
        for n, (lo, hi) in enumerate(self._chunks):
            if self.cuda:
                events[n].synchronize()  # this chunk's gradients are on the host; later ones still copying
            for i in range(lo, hi):
                gpu, cpu = self._pairs[i]
                cpu.grad = self._grads[i] if gpu.grad is not None else None
            self._step_chunk(lo, hi)
            with self._on_side_stream():
                for i in range(lo, hi):
                    gpu, cpu = self._pairs[i]
                    if cpu.grad is not None:
                        gpu.copy_(cpu, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.stream)
        for _, cpu in self._pairs:
            cpu.grad = None
        return None

    def _step_chunk(self, lo: int, hi: int) -> None:
        # AdamW updates only parameters that have a gradient: hide the others' for this chunk.
        keep = {}
        for i, (_, cpu) in enumerate(self._pairs):
            if not lo <= i < hi and cpu.grad is not None:
                keep[i] = cpu.grad
                cpu.grad = None
        super().step()
        for i, g in keep.items():
            self._pairs[i][1].grad = g

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.gpu_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


def _chunks(sizes: list[int]) -> list[tuple[int, int]]:
    out, lo, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= CHUNK_BYTES:
            out.append((lo, i + 1))
            lo, acc = i + 1, 0
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out
