"""Dataclass configs, the named presets and the modes' defaults over them, and `build_config`.

A `Config` is plain data: it is saved with every run (YAML) and inside every checkpoint (a
dict), and rebuilt from either. Each section checks its own fields (`check`, beside them);
`Config.validate()` runs them all and the rules across sections, raising `ConfigError` naming
the field. Overrides from YAML files and `key=value` pairs: `redheart.overrides`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from redheart import heads
from redheart.overrides import ConfigError, apply_mapping, load_yaml, parse_assignment, set_value

PRESETS = ("tiny", "730m", "v1-800m", "v1-320m")
# The names, from the table of heads (redheart/heads.py), for readers of the config; the
# package's modules call `heads.modules()` and `heads.names()` instead, which follow the table.
MODULES = heads.modules()
HEADS = heads.names()


def _check(ok: bool, where: str, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg} (got {value!r})")


@dataclass
class ModelConfig:
    encoder: str = "all-MiniLM-L6-v2"  # built-in encoder name, or a local directory with a BERT-type encoder
    encoder_dim: int = 384  # width of the encoder's token states (checked when the encoder loads)
    hidden: int = 1280  # backbone and tower width
    layers: int = 18  # backbone Transformer layers
    heads: int = 20  # attention heads (hidden must divide by it)
    ffn_mult: int = 4  # feed-forward width = ffn_mult * hidden
    tower_layers: int = 4  # Transformer layers inside each task tower
    tower_mlp: int = 5888  # hidden width of each tower's output MLP (hidden -> tower_mlp -> hidden -> out)
    dropout: float = 0.1  # dropout in the backbone and towers (the encoder is frozen, no dropout)
    max_tokens: int = 256  # encoder tokens per text (longer texts are truncated)
    activation_checkpointing: bool = False  # recompute layer activations in backward to save memory
    # The encoder's top N layers train with the network (from its pretrained weights, part of the
    # backbone module, at train.encoder_lr_ratio of the LR); 0 = the whole encoder frozen
    encoder_trainable: int = 0

    def check(self) -> None:
        for name in ("encoder_dim", "hidden", "layers", "heads", "ffn_mult", "tower_mlp", "max_tokens"):
            v = getattr(self, name)
            _check(v >= 1, f"model.{name}", "must be >= 1", v)
        _check(self.tower_layers >= 0, "model.tower_layers", "must be >= 0", self.tower_layers)
        _check(self.hidden % self.heads == 0, "model.heads", f"must divide model.hidden={self.hidden}", self.heads)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _check(self.max_tokens <= 512, "model.max_tokens", "the encoder reads at most 512 tokens", self.max_tokens)
        _check(self.encoder_trainable >= 0, "model.encoder_trainable", "must be >= 0 (encoder layers trained)",
               self.encoder_trainable)


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # data specs (file, folder, or FORMAT:PATH); empty = the shipped sample
    # evaluation only, never trained on: the final (crossover) model is scored on each at the end
    # of the run (`redheart evaluate`: dilemmas:PATH for Scruples dilemmas, or any data spec)
    eval_paths: list[str] = field(default_factory=list)
    max_records: int = 0  # use at most this many records after import (0 = all); a stable slice by id hash
    max_train_records: int = 0  # use at most this many training records (0 = all); validation is not cut
    train_frac: float = 0.8  # split fractions, by a hash of the record id
    val_frac: float = 0.1  # the rest is the test split
    skip_bad_records: bool = False  # skip (and count) bad lines instead of stopping with an error
    # Sort the samples of this many optimizer steps by length so a step holds similar lengths
    # (less padding). Off by default: with mixed sources it makes each step one source's texts.
    length_group_steps: int = 0
    encoder_cache: str = "auto"  # keep the frozen encoder's token states in memory: auto | on | off
    encoder_cache_gb: float = 4.0  # "auto" caches when the estimated cache is under this size

    def check(self) -> None:
        _check(self.max_records >= 0, "data.max_records", "must be >= 0", self.max_records)
        _check(self.max_train_records >= 0, "data.max_train_records", "must be >= 0", self.max_train_records)
        _check(0 < self.train_frac < 1, "data.train_frac", "must be in (0, 1)", self.train_frac)
        _check(0 < self.val_frac < 1, "data.val_frac", "must be in (0, 1)", self.val_frac)
        _check(self.train_frac + self.val_frac < 1, "data.val_frac", "train_frac + val_frac must leave a test split",
               self.val_frac)
        _check(self.length_group_steps >= 0, "data.length_group_steps", "must be >= 0", self.length_group_steps)
        _check(self.encoder_cache in ("auto", "on", "off"), "data.encoder_cache", "auto, on or off", self.encoder_cache)


@dataclass
class TrainConfig:
    epochs: int = 60
    micro_batch: int = 2  # samples per forward/backward
    grad_accum: int = 32  # micro-batches per optimizer step; effective batch = micro_batch * grad_accum
    lr: float = 1e-4  # peak learning rate (the LR sweep's choice replaces it when the sweep runs)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05  # share of all optimizer steps spent in linear warm-up
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    clip_norm: float = 1.0  # gradient clipping by global norm (0 = off)
    encoder_lr_ratio: float = 0.1  # the trained encoder layers' LR as a share of lr (model.encoder_trainable)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPUs that have it, else fp32) | bf16 | fp32
    save_every: int = 2  # write an epoch snapshot every N epochs (the guide: every even epoch)
    keep_checkpoints: int = 30  # at most this many epoch snapshots; pinned ones are never deleted
    snapshot_dtype: str = "bf16"  # dtype of the weights in epoch snapshots: bf16 | fp32
    snapshot_weights: str = "raw"  # which weights the epoch snapshots keep for Sweet Spot/Crossover: raw | ema
    head_weights: dict[str, float] = field(default_factory=lambda: {h: 1.0 for h in heads.names()})
    eval_batch: int = 32  # samples per forward pass in validation (does not change any result)
    log_every: int = 10  # optimizer steps between progress lines (--verbose: every step)
    max_bad_steps: int = 5  # consecutive non-finite steps that stop the run

    # The runtime switches from here on: how the steps are computed, saved and shared rather
    # than what the run learns. In `train` still, so that every saved config and every
    # `--set train.X` key reads as before; their `auto` values are settled in redheart/train.

    # choose the largest micro-batch that fits (measured on a GPU, estimated on the CPU) and
    # recompute the accumulation; `--batch-size auto` (redheart/train/autobatch.py)
    auto_micro_batch: bool = False
    micro_batch_tokens: int = 0  # >0: micro-batches of similar length up to this many padded tokens (max micro_batch samples)
    compile: bool = False  # torch.compile each Transformer layer (GPU; pays at large micro-batches)
    # the code that launches a compiled layer's kernels: cpp (Inductor's C++ wrapper) or python;
    # auto: cpp on a GPU, where the Python wrapper's per-kernel work bounds a fast step (H200,
    # micro-batch 64, R-Drop off, alternating in one call: 652.8 and 688.2 against 546.5 and
    # 543.9 samples/s; R-Drop on, GPU-bound: equal; the first compile on an empty Inductor cache
    # about 100 s longer, bench/RESULTS.md); python elsewhere (CPU compiles stay short)
    compile_wrapper: str = "auto"
    cuda_graphs: str = "auto"  # replay forward+backward as CUDA graphs: auto (GPU, micro-batch <= 8) | on | off
    # bf16 copies of the Linear weights cast once per optimizer step, weight gradients summed
    # in fp32 by the GEMM (redheart/model/lowp.py): auto (GPU, bf16 autocast, grad_accum > 1, no
    # compile, no swap manager) | on | off
    bf16_weights: str = "auto"
    # write the epoch-end resume state from a thread while training goes on (a 730m state is
    # 10.9 GB, ~20 s to write; the copy takes as much host memory, so never with the swap
    # manager): auto (on a GPU) | on | off; stops and the end always wait for it
    async_save: str = "auto"
    # pack the texts of a micro-batch end to end in rows for the token-wise layers instead of
    # padding each to the longest (redheart/model/packing.py): auto (micro-batches of more than
    # 8 texts; with train.cuda_graphs=on the graphs replay packed rows) | on | off. Micro-batch
    # 64 on an H200, R-Drop off, same call: 536.4 against 383.0 samples/s compiled, 461.6
    # against 339.6 eager (bench/RESULTS.md).
    packing: str = "auto"
    # attention over packed rows: varlen (FlashAttention within each text's segment of the rows,
    # redheart/model/varlen.py) or padded (back to one row per text and a key-padding mask,
    # then packed again); auto: varlen where it runs (GPU of compute capability 8.0+, bf16 or
    # fp16 autocast) unless CUDA graphs replay the steps. H200, micro-batch 64 compiled, one
    # call: R-Drop on 329.1 -> 380.6 samples/s; kernels a step 96.4 -> 81.2 ms (R-Drop off)
    packed_attention: str = "auto"
    # where a step's finite check (skip the update on a NaN/Inf loss or gradient) is decided:
    # "deferred" leaves it on the device (fused AdamW skips its update there) and reads it while
    # the next step's work is queued, so the host never waits for the GPU inside a step; the
    # schedule, EMA and counts follow as in "sync". auto: deferred on a GPU where possible (fused
    # AdamW, no swap manager, not FSDP; with several ranks the summed loss parts and the stop
    # request are read with it). Micro-batch 64, compiled, on an H200 (with ATen's dropout,
    # bench/RESULTS.md): 511 -> 557 samples/s without R-Drop, 313 -> 329 with it; two H200s at
    # the guide's configuration, with the all-reduce no longer waited for: 84.5-85.2% -> 87.0%
    finite_check: str = "auto"
    # >0: global step K runs under torch.profiler on every rank; a summary (GPU time by kernel
    # kind, how busy the GPU was, the host's top operations) and a Chrome trace go to
    # logs/profile_step{K}_rank{R}.json / .trace.json (redheart/train/profile.py). 0: off
    profile_step: int = 0
    resume_states_kept: int = 2  # full resume states kept (the newest and its predecessor as a fallback)
    # A resume state also mid-epoch once this many minutes have passed since the last one was
    # begun, so that a kill that leaves no time to save (SIGKILL, a lost machine) costs at most
    # that much training; 0: at the ends of epochs (and on a stop) only
    resume_every_minutes: float = 30.0
    # How --gpus N processes share the model: ddp (each holds all of it; gradients summed) | fsdp
    # (PyTorch FSDP2: weights, gradients and AdamW state sharded 1/N, for a model that does not
    # fit one GPU; no CUDA graphs, train.compile or swap manager). Like --gpus, it comes from the
    # command line on --resume; checkpoints are the same plain files either way.
    parallel: str = "ddp"
    # dtype in which DDP sums the gradients across GPUs: fp32 | bf16 (half the bytes on the
    # wire; each rank's gradient and the sum rounded to bf16, as PyTorch DDP's bf16_compress_hook)
    grad_reduce: str = "fp32"
    # DDP on GPUs: start each bucket's all-reduce as soon as the last micro-batch's backward has
    # written its gradients (also inside a replayed CUDA graph), while the backward goes on
    # (redheart/dist.py GradReadiness); off: after the whole backward
    overlap_grad_reduce: bool = True

    def check(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.micro_batch >= 1, "train.micro_batch", "must be >= 1", self.micro_batch)
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1", self.grad_accum)
        _check(0 < self.lr < 1, "train.lr", "must be in (0, 1)", self.lr)
        # torch takes 64 bits; data order x 1e6
        _check(0 <= self.seed < 2**32, "train.seed", "must be in [0, 2**32)", self.seed)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "two values in [0, 1)",
               self.betas)
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.clip_norm >= 0, "train.clip_norm", "must be >= 0", self.clip_norm)
        _check(0 < self.encoder_lr_ratio <= 10, "train.encoder_lr_ratio", "must be in (0, 10]", self.encoder_lr_ratio)
        _check(self.precision in ("auto", "bf16", "fp32"), "train.precision", "auto, bf16 or fp32", self.precision)
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "train.device",
               "auto, cpu, cuda or cuda:N", self.device)
        _check(self.save_every >= 1, "train.save_every", "must be >= 1", self.save_every)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        _check(self.snapshot_dtype in ("bf16", "fp32"), "train.snapshot_dtype", "bf16 or fp32", self.snapshot_dtype)
        _check(self.snapshot_weights in ("raw", "ema"), "train.snapshot_weights", "raw or ema", self.snapshot_weights)
        _check(set(self.head_weights) == set(heads.names()), "train.head_weights",
               f"exactly the heads {heads.names()}", sorted(self.head_weights))
        for h, w in self.head_weights.items():
            _check(w >= 0, f"train.head_weights.{h}", "must be >= 0", w)
        _check(self.micro_batch_tokens >= 0, "train.micro_batch_tokens", "must be >= 0", self.micro_batch_tokens)
        for name in ("cuda_graphs", "bf16_weights", "async_save", "packing"):
            v = getattr(self, name)
            _check(v in ("auto", "on", "off"), f"train.{name}", "auto, on or off", v)
        _check(self.compile_wrapper in ("auto", "cpp", "python"), "train.compile_wrapper", "auto, cpp or python",
               self.compile_wrapper)
        _check(self.packed_attention in ("auto", "varlen", "padded"), "train.packed_attention",
               "auto, varlen or padded", self.packed_attention)
        _check(not (self.packed_attention == "varlen" and self.cuda_graphs == "on"), "train.packed_attention",
               "varlen is not replayed by CUDA graphs (train.cuda_graphs=on)", self.packed_attention)
        _check(self.finite_check in ("auto", "sync", "deferred"), "train.finite_check", "auto, sync or deferred",
               self.finite_check)
        _check(self.grad_reduce in ("fp32", "bf16"), "train.grad_reduce", "fp32 or bf16", self.grad_reduce)
        _check(self.eval_batch >= 1, "train.eval_batch", "must be >= 1", self.eval_batch)
        _check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1", self.max_bad_steps)
        _check(self.profile_step >= 0, "train.profile_step", "must be >= 0 (0: no profile)", self.profile_step)
        _check(self.resume_states_kept >= 1, "train.resume_states_kept", "must be >= 1", self.resume_states_kept)
        _check(self.resume_every_minutes >= 0, "train.resume_every_minutes", "must be >= 0 (0: at epoch ends only)",
               self.resume_every_minutes)
        _check(self.parallel in ("ddp", "fsdp"), "train.parallel", "ddp or fsdp", self.parallel)


@dataclass
class TechniqueConfig:
    label_smoothing: float = 0.1  # on the emotion (and surd) soft-target cross-entropy; 0 = off
    smooth_surd: bool = True  # apply the label smoothing to the surd distribution too
    rdrop_alpha: float = 1.0  # weight of the R-Drop consistency term; 0 = off
    # training loss of the [0, 1] heads (bentham, regret) from their logits: bce (binary
    # cross-entropy against the target value; its gradient never vanishes) | mse (squared error
    # of the sigmoid, whose gradient vanishes where the sigmoid saturates: a head can die)
    value_loss: str = "bce"
    # weigh each record's regret and Bentham loss by the votes its shares come from (Scruples):
    # n / (1 + (n - 1) * vote_overdispersion), normalised to mean 1 (data/dataset.py vote_weights); on the
    # public corpus (median 7 votes) a share of 2 votes then counts 0.39x, of 7 0.93x, of 40 1.73x
    vote_weighting: bool = True
    vote_overdispersion: float = 0.1  # the beta-binomial intra-post correlation: 1 = every record alike
    ema_decay: float = 0.999  # EMA of the weights; 0 = off
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)) so early steps are not frozen at init
    ema_device: str = "same"  # same (as the model) | cpu

    def check(self) -> None:
        _check(0 <= self.label_smoothing < 1, "tech.label_smoothing", "must be in [0, 1)", self.label_smoothing)
        _check(self.rdrop_alpha >= 0, "tech.rdrop_alpha", "must be >= 0", self.rdrop_alpha)
        _check(self.value_loss in ("bce", "mse"), "tech.value_loss", "bce or mse", self.value_loss)
        _check(0 < self.vote_overdispersion <= 1, "tech.vote_overdispersion", "must be in (0, 1]",
               self.vote_overdispersion)
        _check(0 <= self.ema_decay < 1, "tech.ema_decay", "must be in [0, 1)", self.ema_decay)
        _check(self.ema_device in ("same", "cpu"), "tech.ema_device", "same or cpu", self.ema_device)


@dataclass
class SweepConfig:
    enabled: bool = False  # run the LR sweep before training (unified-test turns it on)
    lr_min: float = 1e-5
    lr_max: float = 1e-2
    points: int = 5  # learning rates, log-spaced over [lr_min, lr_max]
    steps: int = 30  # optimizer steps per learning rate
    eval_every: int = 5  # validation every N steps of a sweep run
    score_last: int = 3  # score = mean validation loss of the last N evaluations
    refine: bool = False  # a second round of 3 rates around the winner

    def check(self) -> None:
        _check(0 < self.lr_min < self.lr_max < 1, "sweep.lr_min", "need 0 < lr_min < lr_max < 1",
               (self.lr_min, self.lr_max))
        _check(self.points >= 2, "sweep.points", "must be >= 2", self.points)
        _check(self.steps >= 1, "sweep.steps", "must be >= 1", self.steps)
        _check(1 <= self.eval_every <= self.steps, "sweep.eval_every", "must be in [1, sweep.steps]", self.eval_every)
        _check(self.score_last >= 1, "sweep.score_last", "must be >= 1", self.score_last)


@dataclass
class SweetSpotConfig:
    smoothing: int = 3  # centred moving-average window over epochs (1 = none)
    tolerance: float = 0.01  # relative distance to the best smoothed value that counts as the plateau
    trend_alpha: float = 0.05  # Mann-Kendall significance for "still improving at the end"

    def check(self) -> None:
        _check(self.smoothing >= 1, "sweetspot.smoothing", "must be >= 1", self.smoothing)
        _check(self.tolerance >= 0, "sweetspot.tolerance", "must be >= 0", self.tolerance)
        _check(0 < self.trend_alpha < 1, "sweetspot.trend_alpha", "must be in (0, 1)", self.trend_alpha)


@dataclass
class CrossoverConfig:
    enabled: bool = True
    average_neighbors: bool = False  # also try the mean of the module's weights over the snapshots around its sweet spot
    min_gain: float = 0.0  # a swap is kept only if the combined validation loss falls by more than this

    def check(self) -> None:
        _check(self.min_gain >= 0, "crossover.min_gain", "must be >= 0", self.min_gain)


@dataclass
class MemoryConfig:
    swap: str = "auto"  # Dynamic Swap Manager: auto (on when the estimate exceeds the GPU) | on | off
    max_oom_retries: int = 4  # halvings of the micro-batch before the swap manager, then a clean stop
    monitor: bool = False  # sample memory every step (train-local turns it on)

    def check(self) -> None:
        _check(self.swap in ("auto", "on", "off"), "memory.swap", "auto, on or off", self.swap)
        _check(self.max_oom_retries >= 0, "memory.max_oom_retries", "must be >= 0", self.max_oom_retries)


@dataclass
class Config:
    preset: str = "730m"
    output_dir: str = "training"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tech: TechniqueConfig = field(default_factory=TechniqueConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    sweetspot: SweetSpotConfig = field(default_factory=SweetSpotConfig)
    crossover: CrossoverConfig = field(default_factory=CrossoverConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def effective_batch(self) -> int:
        return self.train.micro_batch * self.train.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Rebuild a config saved by `to_dict` (unknown keys and bad values are an error: a saved
        config may have been edited, and a model built from a bad one fails far from the cause)."""
        cfg = cls()
        apply_mapping(cfg, data, origin="saved config")
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"saved config: {exc}") from None

    def validate(self) -> "Config":
        """Every section's own checks, and the rules across sections; the first bad value raises."""
        _check(self.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}", self.preset)
        self.model.check()
        self.data.check()
        self.train.check()
        if self.train.parallel == "fsdp":
            self._check_fsdp()
        for section in (self.tech, self.sweep, self.sweetspot, self.crossover, self.memory):
            section.check()
        return self

    def _check_fsdp(self) -> None:
        """What FSDP2 (weights, gradients and optimizer state sharded) cannot run with."""
        t = self.train
        _check(not t.compile, "train.compile", "not available with train.parallel=fsdp", t.compile)
        _check(t.cuda_graphs != "on", "train.cuda_graphs", "auto or off with train.parallel=fsdp "
               "(FSDP gathers weights in every forward: no CUDA graphs)", t.cuda_graphs)
        _check(t.bf16_weights != "on", "train.bf16_weights", "auto or off with train.parallel=fsdp "
               "(FSDP gathers the weights for every forward)", t.bf16_weights)
        _check(self.memory.swap != "on", "memory.swap", "auto or off with train.parallel=fsdp "
               "(FSDP shards the optimizer state instead)", self.memory.swap)
        _check(self.tech.ema_device == "same", "tech.ema_device", "same with train.parallel=fsdp "
               "(the average is sharded like the weights)", self.tech.ema_device)
        _check(t.grad_reduce == "fp32", "train.grad_reduce", "fp32 with train.parallel=fsdp "
               "(FSDP reduce-scatters the gradients itself)", t.grad_reduce)


def preset(name: str) -> Config:
    """The named preset's config. `tiny` runs the same code as `730m` at a CPU-friendly size."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = Config(preset=name)
    m, t = cfg.model, cfg.train
    if name == "tiny":
        m.hidden, m.layers, m.heads, m.tower_layers, m.tower_mlp = 64, 2, 4, 1, 128
        m.max_tokens = 128
        t.micro_batch, t.grad_accum, t.epochs, t.lr = 2, 8, 2, 1e-3
        t.snapshot_dtype = "fp32"
    elif name == "v1-800m":  # legacy layout: ~300M backbone + ~500M towers
        m.layers, m.tower_layers, m.tower_mlp = 15, 6, 3072
    elif name == "v1-320m":
        m.hidden, m.heads, m.layers, m.tower_layers, m.tower_mlp = 1024, 16, 12, 3, 2048
    return cfg


@dataclass(frozen=True)
class Mode:
    """A run_learning.sh mode's defaults: its preset, and settings over the preset's and the
    --config files' (the flags and --set come after them)."""

    presets: tuple[str, ...] = ("730m",)  # trained one after another (--preset names one instead)
    cpu_preset: str | None = None  # instead of `presets` when there is no GPU (None: keep them)
    samples: str | None = "train.epochs"  # the key that --samples N (or SAMPLES=N) sets; None: unused
    settings: dict[str, Any] = field(default_factory=dict)  # dotted key -> value


# The quick tests: an LR sweep, 2 epochs, and a snapshot every epoch so that Sweet Spot and
# Crossover have a choice.
QUICK_TEST = {"sweep.enabled": True, "sweep.steps": 20, "train.save_every": 1, "train.epochs": 2}
MODES = {
    "unified-test": Mode(cpu_preset="tiny", settings=QUICK_TEST),
    "unified-train": Mode(),
    "unified-test-v1": Mode(presets=("v1-800m", "v1-320m"), settings=QUICK_TEST),
    "train-local": Mode(cpu_preset="tiny", samples="data.max_train_records", settings={
        "data.max_train_records": 3, "memory.monitor": True, "train.epochs": 2, "train.log_every": 1}),
    "validate": Mode(cpu_preset="tiny", samples=None),
}
# unified-test-v1 without a GPU (and without --max-records): a bounded check of each preset,
# over everything else, at most V1_CPU_EPOCHS epochs
V1_CPU_CHECK = {"data.max_records": 40, "train.grad_accum": 4, "sweep.enabled": False}
V1_CPU_EPOCHS = 2


def apply_mode(cfg: Config, mode: str, samples: int | None) -> None:
    """The mode's settings, and --samples N (or SAMPLES=N) on the key it sets there."""
    m = MODES[mode]
    for key, value in m.settings.items():
        set_value(cfg, key, value, origin=mode)
    if samples is not None and m.samples:
        set_value(cfg, m.samples, samples, origin="--samples")


def build_config(
    preset_name: str,
    yaml_files: list[str] | None = None,
    assignments: list[str] | None = None,
) -> Config:
    """Preset, then each YAML file, then each `key=value`; validated."""
    cfg = preset(preset_name)
    for f in yaml_files or []:
        data = load_yaml(f)
        if "preset" in data and data["preset"] != preset_name:
            cfg = preset(str(data["preset"]))
        apply_mapping(cfg, data, origin=str(f))
    for a in assignments or []:
        key, value = parse_assignment(a)
        set_value(cfg, key, value)
    return cfg.validate()
