"""From data specs to tokenised splits: import, slice, split, tokenise, count."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from redheart.config import Config
from redheart.data.dataset import SPLITS, TaskData, split_records, take_slice, vote_weights
from redheart.data.importers import LoadedData, LoadReport, data_specs, load_data
from redheart.data.schema import DataError
from redheart.model.encoder import DEFAULT_ENCODER, Tokenizer

log = logging.getLogger("redheart")


@dataclass
class DataBundle:
    report: LoadReport
    splits: dict[str, TaskData]
    pad_id: int

    def head_counts(self) -> dict[str, dict[str, int]]:
        """Labelled records per head and split (a `values` head: records with any labelled value)."""
        out = {}
        for s, d in self.splits.items():
            counts = {h: int(getattr(d, f"{h}_mask").reshape(len(d), -1).any(-1).sum()) if len(d) else 0
                      for h in d.head_names}
            counts["records"] = len(d)
            out[s] = counts
        return out


def prepare_data(cfg: Config, tokenizer: Tokenizer, loaded: LoadedData | None = None) -> DataBundle:
    """The splits, tokenised. `loaded`: the records already read for this config (the command
    line reads them first, so that a bad file fails before the heavy imports); read here when
    absent or read for other specs (a resumed run's saved config)."""
    specs = data_specs(cfg.data.paths)
    if loaded is None or (loaded.specs, loaded.skip_bad) != (specs, cfg.data.skip_bad_records):
        loaded = load_data(cfg.data.paths, cfg.data.skip_bad_records)
    records, report = loaded.records, loaded.report
    for fr in report.files:
        if fr.skipped:
            log.warning("%s: skipped %d bad line(s) of %d: %s", fr.path, fr.skipped, fr.lines,
                        "; ".join(f"{k} x{v}" for k, v in fr.reasons.most_common(3)))
        if fr.no_target:
            log.info("%s: %d record(s) without any target left out", fr.path, fr.no_target)
    if report.duplicates:
        log.warning("%d record(s) with a repeated id left out (first occurrence kept)", report.duplicates)
    if not records:
        raise DataError(", ".join(specs), None, None, "no usable records")
    if cfg.data.max_records:
        records = take_slice(records, cfg.data.max_records)
    non_en = sum(r.lang != "en" for r in records)
    if non_en and cfg.model.encoder == DEFAULT_ENCODER:
        log.warning("%d record(s) are not in English; the default encoder (%s) reads English only: "
                    "use a multilingual encoder (--set model.encoder=PATH) for them", non_en, DEFAULT_ENCODER)
    by_split = split_records(records, cfg.data.train_frac, cfg.data.val_frac)
    if cfg.data.max_train_records:
        by_split["train"] = take_slice(by_split["train"], cfg.data.max_train_records)
    if not by_split["train"]:
        raise DataError(", ".join(specs), None, None, f"the training split is empty ({len(records)} records in all)")
    if not by_split["val"]:
        raise DataError(", ".join(specs), None, None,
                        f"the validation split is empty ({len(records)} records in all): "
                        "validation runs every epoch, so give more records or a larger data.val_frac")
    splits = {s: TaskData(by_split[s], tokenizer([r.text for r in by_split[s]])) for s in SPLITS}
    if cfg.tech.vote_weighting:
        for d in splits.values():
            d.weight = vote_weights(d.votes, cfg.tech.vote_overdispersion)
    return DataBundle(report=report, splits=splits, pad_id=tokenizer.pad_id)
