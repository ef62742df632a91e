"""The guide's main command end to end, in a real process: LR sweep -> training -> Sweet Spot ->
Crossover, with SAMPLES honoured, every output written, and the final model usable."""
import json

import torch

from redheart.ckpt.rebuild import model_from_checkpoint

from helpers import cli, newest_state


def test_unified_test_writes_every_output_and_honours_samples(tmp_path):
    out = tmp_path / "training"
    proc = cli("unified-test", "--output-dir", str(out), "--max-records", "90",
               "--set", "sweep.steps=6", "--set", "sweep.eval_every=3", "--set", "sweep.score_last=2",
               env={"SAMPLES": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU found: unified-test uses the 'tiny' preset" in proc.stderr or "cuda" in proc.stderr

    metrics = [json.loads(line) for line in next((out / "logs").glob("metrics_*.jsonl")).read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # SAMPLES=3 -> 3 epochs

    sweep = json.loads(next((out / "lr_sweep_results").glob("lr_sweep_*.json")).read_text())
    assert len([p for p in sweep["points"] if not p.get("refine")]) == 5
    assert sweep["selected"] in [p["lr"] for p in sweep["points"]] and sweep["reason"]
    png = next((out / "lr_sweep_results").glob("lr_sweep_plot_*.png"))
    assert png.stat().st_size > 10_000
    assert metrics[0]["lr"] <= sweep["lr"]  # training ran at the chosen peak LR (after warm-up/decay)

    meta = json.loads((out / "checkpoints_final" / "metadata.json").read_text())
    assert len(meta) == 3
    for m in meta:
        assert {"loss", "emotion_acc", "ema"} <= set(m["metrics"]) and m["metrics"]["ema"]["loss"] > 0
    spots = json.loads(next((out / "sweet_spot_analysis").glob("sweet_spot_analysis_*.json")).read_text())
    assert set(spots["modules"]) == {"backbone", "emotion", "bentham", "regret", "surd"}
    report = next((out / "sweet_spot_analysis").glob("sweet_spot_report_*.txt")).read_text()
    assert "module" in report and "backbone" in report
    assert len(list((out / "sweet_spot_analysis" / "plots").glob("*.png"))) == 5

    final = out / "checkpoints_final" / "crossover_final.pth"
    ckpt = torch.load(final, weights_only=True)
    assert set(ckpt["source_epochs"]) == {"backbone", "emotion", "bentham", "regret", "surd"}
    assert {"final_epoch", "best_epoch", "crossover", "ema", "linear_probe"} <= set(ckpt["scores"])
    assert (out / "checkpoints_final" / "crossover_final.safetensors").is_file()
    model, _, _ = model_from_checkpoint(final)
    pred = model(torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(torch.softmax(pred["surd"], -1).sum(), torch.tensor(1.0))
    log = next((out / "logs").glob("training_*.log")).read_text()
    assert "LR sweep chose" in log and "Sweet Spot" in log and "crossover" in log


def test_train_local_trains_on_n_samples_and_records_memory(tmp_path):
    out = tmp_path / "training"
    proc = cli("train-local", "--output-dir", str(out), "--samples", "5", "--set", "train.grad_accum=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert newest_state(out)["epoch_stats"]["samples"] == 5  # an epoch is exactly the 5 requested samples
    mem = json.loads(next((out / "logs").glob("memory_*.json")).read_text())
    steps = [s["step"] for s in mem["samples"]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # a reading every optimizer step
    assert all(s["rss_gib"] > 0 for s in mem["samples"])
    assert next((out / "logs").glob("memory_*.png")).stat().st_size > 5_000
    # ... ending with the largest micro-batch that fits and every preset's estimated need
    summary = mem["summary"]
    assert summary["used_gib"] > 0 and summary["how"] == ("measured" if torch.cuda.is_available() else "estimated")
    assert summary["largest_micro_batch"] in (16, 8, 4, 2, 1)
    assert [p["preset"] for p in summary["presets"]] == ["tiny", "730m", "v1-800m", "v1-320m"]
    assert summary["presets"][1]["need_gib"] > 8  # the 730m preset's AdamW training needs more than 8 GiB
    log = next((out / "logs").glob("training_*.log")).read_text()
    assert "largest micro-batch that fits" in log and "estimated need of each preset" in log
