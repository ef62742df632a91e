"""Rebuild a model from any checkpoint this system writes (snapshot, resume state, crossover),
and the initial weights of a resume state saved before its first step (which keeps only their
seed and fingerprint)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from redheart.ckpt import io as ckio
from redheart.config import Config
from redheart.model.network import RedHeartNet


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                          weights: str = "model") -> tuple[RedHeartNet, Config, dict]:
    """(model in eval mode with the checkpoint's weights, its config, the checkpoint dict).

    `weights="ema"` takes the EMA weights of a resume state instead of the raw ones.
    """
    ckpt = ckio.load(path, mmap=True)  # of a resume state only the weights are read in
    if "config" not in ckpt:
        raise ckio.CheckpointError(f"{path} carries no config: cannot rebuild the model")
    cfg = Config.from_dict(ckpt["config"])
    if ckpt.get("weights") == "initial":  # a resume state saved before its first step keeps no weights
        torch.manual_seed(int(ckpt["initial_weights"]["seed"]))
        model = RedHeartNet(cfg.model)
        rebuilt = rebuild_initial_weights(cfg, ckpt["initial_weights"], model)
        if rebuilt is not None:
            model.load_state_dict(rebuilt)
        return model.to(device).eval(), cfg, ckpt
    model = RedHeartNet(cfg.model)
    if weights == "ema":
        if not ckpt.get("ema"):
            raise ckio.CheckpointError(f"{path} holds no EMA weights")
        state = ckpt["ema"]["shadow"]
    else:
        state = ckpt["model_state"]
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise ckio.CheckpointError(f"{path}: weights do not fit the model of its own config: {exc}") from None
    return model.to(device).eval(), cfg, ckpt


def weights_fingerprint(model: torch.nn.Module) -> dict[str, int]:
    """Per tensor, the integer sum of its bits (as 32-bit words): the same for the same weights
    whatever the order of the sum, different for other initial weights (another PyTorch, device
    or config); read on `restore` of a state that keeps no weights."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().flatten()
        words = t.view(torch.int32) if t.element_size() == 4 else t.view(torch.uint8)
        out[name] = int(words.sum(dtype=torch.int64))
    return out


def rebuild_initial_weights(cfg: Config, init: dict[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The seed's initial weights of a state saved before its first step: None when `model`
    holds them (its fingerprint matches: the trainer was built the same way), else rebuilt on
    the device type they were made on (the CPU); CheckpointError if neither gives them."""
    want = {k: int(v) for k, v in init["fingerprint"].items()}
    if weights_fingerprint(model) == want:
        return None
    if init.get("device") == "cpu":
        torch.manual_seed(int(init["seed"]))
        with torch.device("cpu"):
            rebuilt = RedHeartNet(cfg.model)
        torch.manual_seed(cfg.train.seed + 1)  # as the trainer leaves it (restore then sets the saved streams)
        if weights_fingerprint(rebuilt) == want:
            return rebuilt.state_dict()
    raise ckio.CheckpointError(
        f"this resume state was saved before its first optimizer step, and keeps no weights: they are the "
        f"initial weights of seed {init['seed']} on {init.get('device')}, which this machine does not rebuild the "
        f"same (another PyTorch version or device); start anew with --restart")
