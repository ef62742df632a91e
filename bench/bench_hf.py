"""The same model, data and effective batch trained with `transformers.Trainer`, for comparison.

    python bench/bench_hf.py --data SPEC ... --records 2400 --variant guide:2,32 --variant fast:64,1

Each variant is `name:micro_batch,grad_accum[,group]`. The Trainer reads the same optimizer
steps and micro-batches as `bench_train.py` (the same work, token for token); `group` instead
lets it choose with its `group_by_length` sampler (batches of similar length, so less padding,
at the cost of batches that are no longer random: on this corpus long posts and short comments
would each fill their own). The model is RedHeartNet (730m preset), the inputs the frozen
encoder's cached token states (as in our trainer), the loss the plain multi-task loss (R-Drop
off: the reference's work), bf16, fused AdamW, clipping 1.0, cosine schedule. Throughput is
timed from optimizer step `--warmup` on with CUDA synchronisation.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.config import HEADS, preset  # noqa: E402
from redheart.data.dataset import epoch_plan, micro_batches  # noqa: E402
from redheart.model.network import RedHeartNet  # noqa: E402
from redheart.session import build_session  # noqa: E402
from redheart.train.losses import task_loss  # noqa: E402


class Wrapped(nn.Module):
    def __init__(self, net: RedHeartNet, weights: dict[str, float]):
        super().__init__()
        self.net, self.weights = net, weights

    def forward(self, states, keep, inv, **tgt):
        out = self.net(states, keep, True)
        loss, _ = task_loss(out, tgt, inv, self.weights)
        return {"loss": loss}


class Collate:
    def __init__(self, source):
        self.source = source

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        idx = [it["idx"] for it in items]
        d = self.source.data
        index = torch.tensor(idx)
        states = pad_sequence([self.source.sample(i) for i in idx], batch_first=True)
        n = states.shape[1]
        keep = torch.arange(n)[None, :] < d.lengths[index][:, None]
        tgt = d.targets(index)
        counts = [int(tgt[f"{h}_mask"].sum()) for h in HEADS]
        inv = torch.tensor([1.0 / c if c else 0.0 for c in counts])
        return {"states": states, "keep": keep, "inv": inv, **tgt}


def main() -> int:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class InOrder(Trainer):
        """The Trainer reading the dataset in order (the sampler's hook exists in 4.x and 5.x)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    p = argparse.ArgumentParser()
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--records", type=int, default=2400)
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="bench_hf.json")
    p.add_argument("--preset", default="730m")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = preset(args.preset)
    cfg.data.paths, cfg.data.max_records, cfg.train.device = args.data, args.records, dev
    session = build_session(cfg.validate())
    source = session.features["train"]
    lengths = source.data.lengths
    results = []
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        fields = rest.split(",")
        mb, accum, group = int(fields[0]), int(fields[1]), fields[2:] == ["group"]
        torch.manual_seed(0)
        with torch.device(dev):
            model = Wrapped(RedHeartNet(cfg.model), cfg.train.head_weights)
        times: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                sync()
                times.append(time.perf_counter())

        # The same optimizer steps and micro-batches as bench_train.py's (epoch 1 of the trainer's
        # plan, each step cut longest first), read in order: the same work token for token.
        # With `group`, the Trainer's own length-grouped sampler chooses instead.
        plan = epoch_plan(lengths, cfg.effective_batch, cfg.train.seed, 1, 0)
        order = [i for step in plan for part in micro_batches(step, lengths, mb) for i in part]
        # items carry a dummy `input_ids` of the text's length: what group_by_length measures
        dataset = [{"idx": i, "input_ids": [0] * int(lengths[i])} for i in order]
        params = inspect.signature(TrainingArguments).parameters  # the option's name changed in 5.x
        grouping = ({"group_by_length": group} if "group_by_length" in params
                    else {"train_sampling_strategy": "group_by_length"} if group else {})
        targs = TrainingArguments(**grouping,
            output_dir="/tmp/hf_bench", per_device_train_batch_size=mb, gradient_accumulation_steps=accum,
            max_steps=args.warmup + args.steps, learning_rate=1e-4, weight_decay=0.01, warmup_steps=1,
            lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            logging_steps=10_000, save_strategy="no", report_to="none", remove_unused_columns=False,
            dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, seed=0)
        kind = Trainer if group else InOrder
        trainer = kind(model=model, args=targs, train_dataset=dataset, data_collator=Collate(source),
                       callbacks=[Clock()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        seconds = times[-1] - times[args.warmup - 1]
        samples = args.steps * mb * accum
        timed = order[args.warmup * mb * accum:(args.warmup + args.steps) * mb * accum]
        toks = (float(lengths.float().mean()) * samples if group or len(timed) < samples
                else float(sum(int(lengths[i]) for i in timed)))
        r = {"name": name, "micro_batch": mb, "grad_accum": accum, "group_by_length": group, "samples_per_s": samples / seconds,
             "tokens_per_s": toks / seconds, "tokens_exact": not group and len(timed) == samples,
             "step_s": seconds / args.steps,
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}
        results.append(r)
        print(f"HF Trainer {name} (mb {mb} x {accum}): {r['samples_per_s']:.1f} samples/s, step {r['step_s']:.2f}s, "
              f"peak {r['peak_gib']:.1f} GiB", flush=True)
        del trainer, model
        if cuda:
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
