"""The pieces every command shares: device, encoder, tokenised data and feature sources."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from redheart.config import Config
from redheart.data.dataset import SPLITS
from redheart.data.features import FeatureSource, cache_bytes
from redheart.data.importers import LoadedData
from redheart.data.pipeline import DataBundle, prepare_data
from redheart.model.encoder import Encoder, EncoderError, Tokenizer
from redheart.train.plan import pick_device

log = logging.getLogger("redheart")


@dataclass
class Session:
    cfg: Config
    device: torch.device
    tokenizer: Tokenizer
    encoder: Encoder
    data: DataBundle
    features: dict[str, FeatureSource]


def load_encoder(cfg: Config, device: torch.device) -> tuple[Tokenizer, Encoder]:
    tokenizer = Tokenizer(cfg.model.encoder, cfg.model.max_tokens)
    encoder = Encoder.of(cfg.model)
    if encoder.dim != cfg.model.encoder_dim:
        raise EncoderError(f"encoder {cfg.model.encoder!r} gives {encoder.dim}-d token states but "
                           f"model.encoder_dim is {cfg.model.encoder_dim}: set --set model.encoder_dim={encoder.dim}")
    # Frozen, so its precision is free to choose: bf16 on a GPU, fp32 on the CPU.
    encoder = encoder.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return tokenizer, encoder


def build_features(cfg: Config, data: DataBundle, encoder: Encoder, device: torch.device) -> dict[str, FeatureSource]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    need = sum(cache_bytes(d, encoder.dim, dtype) for d in data.splits.values())
    mode = cfg.data.encoder_cache
    cache = mode == "on" or (mode == "auto" and need <= cfg.data.encoder_cache_gb * 2**30)
    log.info("encoder states: %s (%.2f GiB for all splits)", "cached once" if cache else "computed per batch",
             need / 2**30)
    return {s: FeatureSource(encoder, data.splits[s], device, dtype, data.pad_id, cache) for s in SPLITS}


def build_session(cfg: Config, loaded: LoadedData | None = None) -> Session:
    device = pick_device(cfg.train.device)
    tokenizer, encoder = load_encoder(cfg, device)
    data = prepare_data(cfg, tokenizer, loaded)
    features = build_features(cfg, data, encoder, device)
    return Session(cfg, device, tokenizer, encoder, data, features)
