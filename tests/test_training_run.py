"""A real 2-epoch run on the shipped sample data: the loss falls, and it leaves every output."""
import json
from pathlib import Path

import torch

from redheart.ckpt.state import read_registry
from redheart.ckpt.rebuild import model_from_checkpoint
from redheart.model.network import RedHeartNet

from helpers import newest_state, run, tiny_config


def test_two_epochs_on_the_sample_data_lower_the_loss_and_write_the_outputs(tmp_path, monkeypatch):
    import gc
    import weakref

    import redheart.analysis
    import redheart.run

    made, live = [], []  # this run's Trainer (weakly), and whether it is alive when the analysis starts
    trainer_class, original = redheart.run.Trainer, redheart.analysis.run_crossover

    def making(*args, **kwargs):
        trainer = trainer_class(*args, **kwargs)
        made.append(weakref.ref(trainer))
        return trainer

    def checking(*args, **kwargs):
        gc.collect()
        live.append([ref() is not None for ref in made])
        return original(*args, **kwargs)

    monkeypatch.setattr(redheart.run, "Trainer", making)
    monkeypatch.setattr(redheart.analysis, "run_crossover", checking)
    cfg = tiny_config(tmp_path, train__epochs=2, train__save_every=1)
    assert run(cfg) == 0
    assert live == [[False]]  # released before the analysis (an 800M model's 16 GB on the CPU)
    state = newest_state(tmp_path)
    hist = state["history"]
    assert [r["epoch"] for r in hist] == [1, 2]
    assert hist[1]["train"]["loss"] < hist[0]["train"]["loss"]
    assert hist[1]["val"]["loss"] < hist[0]["val"]["loss"]
    # validation ran on the validation split with every head's metrics, raw and EMA
    for key in ("emotion_acc", "emotion_f1", "bentham_mae", "bentham_r", "regret_mae", "regret_r", "surd_mae"):
        assert key in hist[-1]["val"] and key in hist[-1]["val_ema"]
    assert hist[-1]["val"] != hist[-1]["val_ema"]
    assert [r["collapsed"] for r in hist] == [{}, {}]  # a healthy run: no head reported collapsed
    # the trainer's own throughput figures: model TFLOP/s always, MFU only against a GPU's peak
    for r in hist:  # each parameter works at least once per sample: forward + backward >= 6 x params
        assert r["mfu"] is None
        assert r["tflops"] * 1e12 * r["seconds"] >= 6 * state["param_counts"]["total"] * r["samples"]

    ck = tmp_path / "checkpoints_final"
    meta = json.loads((ck / "metadata.json").read_text())
    assert [m["epoch"] for m in meta] == [1, 2]
    for m in meta:
        peak = state["lr"]  # the LR sweep's choice: the names carry it, not the decayed LR
        assert Path(m["path"]).name.startswith(f"checkpoint_epoch_{m['epoch']:04d}_lr_{peak:.6f}_")
        assert set(m) >= {"epoch", "lr", "path", "timestamp", "sha256", "metrics", "size_bytes"}
        assert isinstance(m["metrics"]["loss"], float)
        # the loss components of training and the validation metrics of both weight sets
        assert {"loss", "task", "rdrop", "emotion", "bentham", "regret", "surd"} <= set(m["metrics"]["train"])
        assert m["metrics"]["train"]["rdrop"] > 0 and m["metrics"]["ema"]["loss"] > 0
        loaded = torch.load(m["path"], weights_only=True)  # the guide's own loading code
        net = RedHeartNet(cfg.model)
        net.load_state_dict(loaded["model_state"])
    assert (ck / "crossover_final.pth").is_file() and (ck / "crossover_final.safetensors").is_file()
    assert len(read_registry(tmp_path)) <= cfg.train.resume_states_kept
    logs = list((tmp_path / "logs").glob("training_*.log"))
    assert len(logs) == 1 and "epoch 2/2" in logs[0].read_text()
    assert list((tmp_path / "logs").glob("config_*.yaml"))
    assert list((tmp_path / "sweet_spot_analysis").glob("sweet_spot_report_*.txt"))


def test_any_checkpoint_rebuilds_a_model_that_predicts(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=1, data__max_records=60)
    assert run(cfg) == 0
    for path in [*(tmp_path / "checkpoints_final").glob("*.pt"), tmp_path / "checkpoints_final" / "crossover_final.pth"]:
        model, cfg2, _ = model_from_checkpoint(path)
        out = model(torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool))
        assert torch.allclose(torch.softmax(out["emotion"], -1).sum(-1), torch.ones(2))
        assert cfg2.model == cfg.model


def test_retention_keeps_at_most_30_snapshots_in_a_real_run(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=33, train__save_every=1, data__max_records=60,
                      train__micro_batch=16, train__grad_accum=2, tech__ema_decay=0.0, tech__rdrop_alpha=0.0)
    assert run(cfg, analysis=False) == 0
    files = sorted((tmp_path / "checkpoints_final").glob("checkpoint_epoch_*.pt"))
    meta = json.loads((tmp_path / "checkpoints_final" / "metadata.json").read_text())
    assert len(files) == len(meta) <= 30
    assert {Path(m["path"]).name for m in meta} == {f.name for f in files}
    assert max(m["epoch"] for m in meta) == 33  # the newest is never the one deleted


def test_a_profiled_step_writes_its_summary_and_changes_nothing(tmp_path):
    """`train.profile_step=2`: step 2 runs under torch.profiler and its summary and Chrome trace
    are written beside the logs; the run ends at the weights of the run without it, bit for bit."""
    states = {}
    for name, k in (("plain", 0), ("profiled", 2)):
        cfg = tiny_config(tmp_path / name, train__epochs=1, data__max_records=60, train__profile_step=k)
        assert run(cfg, analysis=False) == 0
        states[name] = newest_state(tmp_path / name)
    assert not list((tmp_path / "plain" / "logs").glob("profile_*"))
    logs = tmp_path / "profiled" / "logs"
    summary = json.loads((logs / "profile_step2_rank0.json").read_text())
    trace = json.loads((logs / "profile_step2_rank0.trace.json").read_text())
    assert trace["traceEvents"] and summary["trace"] == str(logs / "profile_step2_rank0.trace.json")
    assert summary["wall_ms"] > 0 and summary["kernels"] == 0  # on the CPU: no GPU kernels
    assert summary["host_waits"] == []  # no CUDA: nothing to wait for
    # every micro-batch of the step annotated with its texts and tokens (host time only here)
    assert sum(m["count"] for m in summary["micro_batches"]) == cfg.train.grad_accum, summary["micro_batches"]
    assert all(m["host_ms"] > 0 and m["gpu_ms"] is None for m in summary["micro_batches"])
    host = {op["name"] for op in summary["host_top"]}
    assert host & {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::_fused_adamw_"}, host
    assert "step 2 profiled:" in "".join(p.read_text() for p in logs.glob("training_*.log"))
    a, b = states["plain"], states["profiled"]
    assert a["global_step"] == b["global_step"] > 2
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])


def test_the_profile_names_where_the_host_waited_for_the_gpu():
    """`host_waits` on a trace shaped like the one that found a 103 ms stall on two H200s: a
    synchronize inside `aten::copy_` (a host scalar written into a device tensor) is reported
    with that operation; a short one and the profiler's own closing sync are not."""
    from redheart.train.profile import CLOSING, host_waits

    def span(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [span("cpu_op", "aten::add", 1000.0, 50.0),
              span("cpu_op", "aten::copy_", 129_006.0, 102_870.0),
              span("cuda_runtime", "cudaMemcpyAsync", 129_016.0, 17.0),
              span("cuda_runtime", "cudaStreamSynchronize", 129_035.0, 102_783.0),
              span("cpu_op", "aten::_local_scalar_dense", 240_000.0, 300.0),
              span("cuda_runtime", "cudaStreamSynchronize", 240_010.0, 120.0),  # 0.12 ms: not a wait
              span("user_annotation", CLOSING, 250_000.0, 9_000.0),
              span("cuda_runtime", "cudaDeviceSynchronize", 250_010.0, 8_900.0),
              {"ph": "i", "cat": "cpu_instant_event", "name": "x", "ts": 0.0}]
    waits = host_waits(events)
    assert waits == [{"at_ms": 128.035, "ms": 102.783, "call": "cudaStreamSynchronize", "op": "aten::copy_"}]
