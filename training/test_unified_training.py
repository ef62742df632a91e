"""The guide's component test.

    python training/test_unified_training.py --quick   # component checks, a few seconds
    python training/test_unified_training.py           # the whole test suite (pytest)

Re-runs itself in red_heart_env when the current Python lacks the project's packages.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import torch
except ImportError:
    venv_python = ROOT / "red_heart_env" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parents[1].resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    raise SystemExit("error: PyTorch is not installed here; run `bash run_learning.sh validate` once to set up red_heart_env")


def quick_checks() -> list[tuple[str, callable]]:
    from redheart.ckpt import io as ckio
    from redheart.ckpt.crossover import merge_modules
    from redheart.ckpt.sweetspot import find_sweet_spot
    from redheart.config import preset
    from redheart.data.dataset import TaskData, collate
    from redheart.data.importers import load_records, sample_data_path
    from redheart.model.encoder import Encoder, Tokenizer
    from redheart.model.modules import preset_parameter_counts
    from redheart.model.network import RedHeartNet
    from redheart.train.losses import rdrop_consistency, task_loss

    cfg = preset("tiny")
    state = {}

    def config():
        counts = preset_parameter_counts(preset("730m"))
        assert abs(counts["total"] - 730e6) < 7.3e6, counts
        return f"730m preset: {counts['total'] / 1e6:.1f}M trainable parameters"

    def data():
        records, report = load_records([str(sample_data_path())])
        assert len(records) >= 200 and report.skipped == 0
        emos = {tuple(r.emotion).index(max(r.emotion)) for r in records}
        assert len(emos) == 7, "emotion labels are not varied"
        state["records"] = records[:8]
        return f"sample data: {len(records)} records, all 7 emotions present as the dominant one"

    def encoder():
        tok = Tokenizer(cfg.model.encoder, cfg.model.max_tokens)
        enc = Encoder.of(cfg.model)
        recs = state["records"]
        td = TaskData(recs, tok([r.text for r in recs]))
        b = collate(td, list(range(len(recs))), tok.pad_id)
        state["states"], state["batch"] = enc(b.input_ids, b.keep), b
        return f"encoder loaded offline: states {tuple(state['states'].shape)}"

    def step():
        torch.manual_seed(0)
        net = RedHeartNet(cfg.model)
        b = state["batch"]
        counts = {h: int(b.targets[f"{h}_mask"].sum()) for h in ("emotion", "bentham", "regret", "surd")}
        out = net(state["states"], b.keep, b.padded)
        out2 = net(state["states"], b.keep, b.padded)
        loss, parts = task_loss(out, b.targets, counts, cfg.train.head_weights, 0.1)
        cons = rdrop_consistency(out, out2, b.targets, counts)
        (loss + cons).backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        cons = cons.detach()
        assert not missing and float(cons) > 0, (missing, float(cons))
        state["net"] = net
        return f"forward/backward: loss {loss.item():.4f}, R-Drop term {float(cons):.2e}, all parameters have gradients"

    def checkpoint():
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "c.pt"
            info = ckio.atomic_save({"model_state": state["net"].state_dict()}, path)
            back = ckio.load(path, info["sha256"])
            net = RedHeartNet(cfg.model)
            net.load_state_dict(back["model_state"])
        return f"atomic checkpoint round trip, weights_only=True, sha256 {info['sha256'][:12]}"

    def sweet_spot_and_crossover():
        res = find_sweet_spot([1, 2, 3, 4, 5, 6], [1.0, 0.8, 0.6, 0.5, 0.6, 0.8])
        assert res["epoch"] == 4, res
        a = {"backbone.w": torch.zeros(1), "emotion.w": torch.zeros(1)}
        b = {"backbone.w": torch.ones(1), "emotion.w": torch.ones(1)}
        m = merge_modules(a, {"emotion": b})
        assert float(m["backbone.w"]) == 0 and float(m["emotion.w"]) == 1
        return "sweet spot on a clear minimum; module merge"

    return [("config", config), ("data", data), ("encoder", encoder), ("step", step),
            ("checkpoint", checkpoint), ("sweet spot + crossover", sweet_spot_and_crossover)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="component checks only (seconds)")
    args, rest = p.parse_known_args()
    if not args.quick:
        import pytest

        return pytest.main([str(ROOT / "tests"), *rest])
    failed = 0
    for name, fn in quick_checks():
        t = time.time()
        try:
            msg = fn()
            print(f"[ok]   {name:<24} {msg} ({time.time() - t:.1f}s)")
        except Exception as exc:
            failed += 1
            print(f"[FAIL] {name:<24} {type(exc).__name__}: {exc}")
    print(f"{'all component checks passed' if not failed else f'{failed} check(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
