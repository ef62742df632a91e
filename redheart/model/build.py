"""Rebuild a model from any checkpoint this system writes (snapshot, resume state, crossover)."""
from __future__ import annotations

from pathlib import Path

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
        from redheart.train.checkpoints import rebuild_initial_weights

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
