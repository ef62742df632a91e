"""Importers: canonical JSONL, the earlier LLM-labelled Red Heart format, Scruples anecdotes
and GoEmotions TSV (English or Korean), each into canonical records.

The label recipes follow ../shared/data/README.md: a target a source does not give is
missing (None), never a constant. Each bad line raises a `DataError` naming file, line and
field, or, with `skip_bad=True`, is skipped and counted in the `LoadReport`. A file's format
is that of its first record (JSON lines, or one JSON array in a .json file); a record with a
field its format does not have is a bad line, never a record loaded without that field.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from redheart import heads
from redheart.data.schema import (
    BENTHAM, EMOTIONS, SURD, DataError, Record, check_id, check_text, detect_lang, distribution, head_target,
    unit_value, value_vector,
)

FORMATS = ("canonical", "redheart", "scruples", "goemotions")

# GoEmotions label name -> Red Heart emotion (neutral and unlisted names map to nothing).
GOEMOTIONS_GROUPS = {
    "joy": ("joy", "amusement", "excitement", "optimism", "pride", "relief", "love", "desire"),
    "trust": ("admiration", "approval", "caring", "gratitude"),
    "fear": ("fear", "nervousness"),
    "surprise": ("surprise", "realization", "confusion", "curiosity"),
    "sadness": ("sadness", "disappointment", "grief", "embarrassment", "remorse"),
    "disgust": ("disgust",),
    "anger": ("anger", "annoyance", "disapproval"),
}
GOEMOTIONS_LABELS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity",
    "desire", "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear",
    "gratitude", "grief", "joy", "love", "nervousness", "optimism", "pride", "realization", "relief",
    "remorse", "sadness", "surprise", "neutral",
)
_GOEMO_TO_CLASS = {name: EMOTIONS.index(cls) for cls, names in GOEMOTIONS_GROUPS.items() for name in names}

# Every field each JSON format's importer reads, and those of them that carry targets. A record
# with any other field is refused: a field of another format is a target (or text) this
# importer would drop, and a field of none may be one too.
FIELDS = {
    "canonical": ("id", "text", *heads.names(), "source", "votes"),
    "redheart": ("id", "text", "situation", "content", "input", "emotions", "bentham_scores", "regret_factor",
                 "surd", "source"),
    "scruples": ("id", "post_id", "title", "text", "action", "post_type", "label", "binarized_label",
                 "label_scores"),
}
TARGET_FIELDS = {
    "canonical": heads.names(),
    "redheart": ("emotions", "bentham_scores", "regret_factor", "surd"),
    "scruples": ("label_scores",),
}


@dataclass
class FileReport:
    path: str
    format: str
    lines: int = 0
    records: int = 0
    skipped: int = 0
    no_target: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    files: list[FileReport] = field(default_factory=list)
    duplicates: int = 0

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.files)


# ---------------------------------------------------------------------------------------
# Reading lines


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _iter_lines_or_errors(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """(line number from 1, line without its newline, or the DataError of a line that is not
    UTF-8). Lines end at "\n" only, and each line is decoded on its own, so that a decoding
    error names its own line; gzip and read errors (a truncated file) raise a DataError."""
    n = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for n, raw in enumerate(f, start=1):
                raw = raw.rstrip(b"\r\n")
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield n, DataError(str(path), n, None, f"not UTF-8 text ({exc.reason})")
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(str(path), n + 1, None, f"unreadable or truncated file ({exc})") from None


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline); decoding and gzip errors name the line."""
    for n, line in _iter_lines_or_errors(path):
        if isinstance(line, DataError):
            raise line
        yield n, line


def _json_line(line: str, where: tuple[str, int]) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(*where, None, f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(*where, None, "malformed JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise DataError(*where, None, f"malformed JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(*where, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field_name(key: str) -> str:
    """A record's key as an error names it: escaped if it is not plain text, cut if long."""
    name = key if key.isprintable() else ascii(key)  # (a lone surrogate is not printable)
    return name if len(name) <= 60 else name[:57] + "..."


def check_fields(obj: dict[str, Any], fmt: str, where: tuple[str, int]) -> None:
    """Refuse a record with a field that the `fmt` importer does not read, naming the first one
    and saying whose it is: never load the record without it."""
    extra = [k for k in obj if k not in FIELDS[fmt]]
    if not extra:
        return
    key = extra[0]
    owners = [f for f in FIELDS if key in FIELDS[f]]
    target_of = [f for f in owners if key in TARGET_FIELDS[f]]
    if target_of:
        what = f"a {target_of[0]} target, which the {fmt} importer would drop"
    elif owners:
        what = f"a field of the {'/'.join(owners)} format, which the {fmt} importer would drop"
    else:
        what = "unknown field, of no known format"
    also = f"; also {', '.join(_field_name(k) for k in extra[1:])}" if len(extra) > 1 else ""
    raise DataError(*where, _field_name(key), f"{what}{also} (read as {fmt}, whose fields are "
                    f"{', '.join(FIELDS[fmt])}; one format a file, or name it as FORMAT:PATH)")


def record_format(obj: dict[str, Any], where: tuple[str, int]) -> str:
    """The format of a record: the one whose fields cover most of its own (canonical first on
    a tie). Fields it does not cover are refused when the record is read."""
    if "actions" in obj and "gold_annotations" in obj:
        raise DataError(*where, None, "Scruples dilemmas are an evaluation set, not training data for the heads")
    return max(FIELDS, key=lambda f: sum(k in FIELDS[f] for k in obj))


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------
# Per-format record parsers: (object, where) -> Record


def parse_canonical(obj: dict[str, Any], where: tuple[str, int]) -> Record:
    check_fields(obj, "canonical", where)
    if "text" not in obj:
        raise DataError(*where, "text", "missing")
    text = check_text(obj["text"], where)
    rid = check_id(obj["id"], where) if "id" in obj else _stable_id("rec", text)
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise DataError(*where, "source", f"expected a string, got {source!r}")
    votes = obj.get("votes")
    if votes is not None and (isinstance(votes, bool) or not isinstance(votes, int) or votes < 1):
        raise DataError(*where, "votes", f"expected a whole number of votes >= 1, got {votes!r}")
    record = Record(id=rid, text=text, votes=votes, source=source or "canonical", lang=detect_lang(text))
    for h in heads.HEADS:  # each head's field, by its kind (a field the table adds: an attribute)
        setattr(record, h.name, head_target(obj.get(h.name), h, h.name, where))
    return record


def parse_redheart(obj: dict[str, Any], where: tuple[str, int]) -> Record:
    """The earlier LLM-labelled Red Heart datasets: `emotions` as 7 floats in the order
    [Joy, Trust, Fear, Surprise, Sadness, Disgust, Anger] (scores, normalised to shares),
    `bentham_scores` with any subset of the 10 keys, `regret_factor`, optional `surd`."""
    check_fields(obj, "redheart", where)
    text_key = next((k for k in ("text", "situation", "content", "input") if k in obj), None)
    if text_key is None:
        raise DataError(*where, "text", "missing (looked for text, situation, content, input)")
    text = check_text(obj[text_key], where, text_key)
    rid = check_id(obj["id"], where) if "id" in obj else _stable_id("rh", text)
    emo = obj.get("emotions")
    ben = obj.get("bentham_scores")
    reg = obj.get("regret_factor")
    surd = obj.get("surd")
    if isinstance(emo, dict):
        emo = {str(k).strip().lower(): v for k, v in emo.items()}
    for name, val in (("emotions", emo), ("bentham_scores", ben)):
        if val is not None and not isinstance(val, (list, tuple, dict)):
            raise DataError(*where, name, f"expected a list or mapping, got {type(val).__name__}")
    return Record(
        id=rid, text=text,
        emotion=None if emo is None else distribution(emo, EMOTIONS, "emotions", where, normalise_any_sum=True),
        bentham=None if ben is None else value_vector(ben, heads.get("bentham"), "bentham_scores", where),
        regret=None if reg is None else unit_value(reg, "regret_factor", where),
        surd=None if surd is None else distribution(surd, SURD, "surd", where),
        source=str(obj.get("source") or "redheart-llm"), lang=detect_lang(text),
    )


def parse_scruples(obj: dict[str, Any], where: tuple[str, int]) -> Record:
    """Scruples anecdote: regret = (AUTHOR + EVERYBODY) / t, bentham.certainty = max / t,
    with t the non-INFO votes; every other target missing."""
    check_fields(obj, "scruples", where)
    for key in ("id", "title", "text", "label_scores"):
        if key not in obj:
            raise DataError(*where, key, "missing (Scruples anecdote)")
    rid = check_id(obj["id"], where)
    title = obj["title"]
    if not isinstance(title, str):
        raise DataError(*where, "title", f"expected a string, got {type(title).__name__}")
    text = check_text(f"{title}\n{obj['text']}" if isinstance(obj["text"], str) else obj["text"], where)
    scores = obj["label_scores"]
    if not isinstance(scores, dict):
        raise DataError(*where, "label_scores", f"expected a mapping, got {type(scores).__name__}")
    votes = {}
    for k in ("AUTHOR", "OTHER", "EVERYBODY", "NOBODY"):
        if k not in scores:
            raise DataError(*where, f"label_scores.{k}", "missing vote count")
        v = scores[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(*where, f"label_scores.{k}", f"expected a vote count >= 0, got {v!r}")
        votes[k] = v
    t = sum(votes.values())
    if t == 0:
        raise DataError(*where, "label_scores", "no AUTHOR/OTHER/EVERYBODY/NOBODY votes")
    bentham: list[float | None] = [None] * len(BENTHAM)
    bentham[BENTHAM.index("certainty")] = max(votes.values()) / t
    return Record(
        id=f"scruples-{rid}", text=text, bentham=bentham,
        regret=(votes["AUTHOR"] + votes["EVERYBODY"]) / t, votes=t, source="scruples", lang=detect_lang(text),
    )


def goemotions_target(label_field: str, where: tuple[str, int]) -> list[float] | None:
    """Comma-separated GoEmotions label ids -> a soft 7-class distribution (None if only neutral)."""
    ids = [s.strip() for s in label_field.split(",") if s.strip()]
    if not ids:
        raise DataError(*where, "labels", "no label ids")
    counts = [0.0] * len(EMOTIONS)
    for s in ids:
        if not (s.isascii() and s.isdigit()) or len(s) > 3 or int(s) >= len(GOEMOTIONS_LABELS):
            raise DataError(*where, "labels", f"unknown GoEmotions label id {s!r} (0-{len(GOEMOTIONS_LABELS) - 1})")
        name = GOEMOTIONS_LABELS[int(s)]
        if name in _GOEMO_TO_CLASS:
            counts[_GOEMO_TO_CLASS[name]] += 1.0
    total = sum(counts)
    return None if total == 0 else [c / total for c in counts]


# ---------------------------------------------------------------------------------------
# Files


def _jsonl_records(path: Path, parse: Callable, report: FileReport, skip_bad: bool) -> Iterator[Record]:
    for n, line in _iter_lines_or_errors(path):
        report.lines = n
        if isinstance(line, str) and not line.strip():
            continue
        where = (str(path), n)
        try:
            if isinstance(line, DataError):
                raise line
            rec = parse(_json_line(line, where), where)
        except DataError as err:
            if not skip_bad:
                raise
            _count_skip(report, err)
            continue
        yield rec


def _count_skip(report: FileReport, err: DataError) -> None:
    report.skipped += 1
    report.reasons[f"{err.field or 'line'}: {err.message.split(' (')[0]}"] += 1
    if len(report.first_errors) < 5:
        report.first_errors.append(str(err))


def _english_ids(ko_path: Path) -> list[str] | None:
    """Comment ids of the line-aligned English file beside a Korean GoEmotions file, if any."""
    en = ko_path.with_name(ko_path.name.replace("_ko_", "_en_"))
    if en == ko_path or not en.is_file():
        return None
    ids = []
    for _, line in iter_lines(en):
        parts = line.split("\t")
        ids.append(parts[2] if len(parts) >= 3 else "")
    return ids


def _goemotions_records(path: Path, report: FileReport, skip_bad: bool) -> Iterator[Record]:
    en_ids = _english_ids(path) if "_ko_" in path.name else None
    # A file named as Korean (English) holds translations (originals) whatever the script of
    # one text: a Korean line left in Latin letters must not take its English original's id.
    file_lang = "ko" if "_ko_" in path.name else "en" if "_en_" in path.name else None
    stem = path.name.split(".")[0]
    for n, line in _iter_lines_or_errors(path):
        report.lines = n
        if isinstance(line, str) and not line.strip():
            continue
        where = (str(path), n)
        try:
            if isinstance(line, DataError):
                raise line
            parts = line.split("\t")
            if len(parts) not in (2, 3):
                raise DataError(*where, None, f"expected 2 or 3 tab-separated columns (text, labels[, id]), got {len(parts)}")
            text = check_text(parts[0], where)
            emotion = goemotions_target(parts[1], where)
            lang = detect_lang(text)
            tag = file_lang or lang
            if len(parts) == 3 and parts[2].strip():
                rid = f"goemotions-{parts[2].strip()}"
            elif en_ids is not None and n <= len(en_ids) and en_ids[n - 1]:
                rid = f"goemotions-{en_ids[n - 1]}"
            else:
                rid = f"goemotions-{stem}-{n}"
            if tag != "en":
                rid += f"#{tag}"  # a translation: same split as its original (see dataset.split_key)
        except DataError as err:
            if not skip_bad:
                raise
            _count_skip(report, err)
            continue
        yield Record(id=rid, text=text, emotion=emotion, source=f"goemotions-{tag}", lang=lang)


def _is_json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (its first character other than white space
    and a byte-order mark is `[`) rather than JSON lines."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            while chunk := f.read(65536):
                head = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
                if head:
                    return head.startswith(b"[")
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(str(path), None, None, f"unreadable or truncated file ({exc})") from None
    return False


def _read_json_array(path: Path) -> list[Any]:
    try:
        with _open_text(path) as f:
            items = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, None, f"malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(str(path), None, None, "malformed JSON (nested too deeply)") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(str(path), None, None, f"unreadable file ({exc})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise DataError(str(path), None, None, f"malformed JSON ({exc})") from None
    return items  # a list: the file starts with "["


def _array_format(path: Path, items: list[Any]) -> str:
    """The format of a JSON array: that of its first object (canonical when it has none)."""
    for i, obj in enumerate(items):
        if isinstance(obj, dict):
            return record_format(obj, (f"{path} item", i))
    return "canonical"


def detect_format(path: Path) -> str:
    """The format of a data file from its name and its first record (the first non-empty line,
    or item of a JSON array, that is a JSON object)."""
    name = path.name.lower()
    if name.endswith((".tsv", ".tsv.gz")):
        return "goemotions"
    if not name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        raise DataError(str(path), None, None,
                        "unknown file type (expected .jsonl, .json or .tsv, optionally .gz; "
                        "or name the format as FORMAT:PATH)")
    if name.endswith((".json", ".json.gz")) and _is_json_array(path):
        return _array_format(path, _read_json_array(path))
    first_error: DataError | None = None
    looked = 0
    for n, line in _iter_lines_or_errors(path):
        if isinstance(line, str) and not line.strip():
            continue
        # A bad line is passed over (it is reported, or skipped, when the file is loaded):
        # the format is that of the first line that is a JSON object, among the first 100.
        looked += 1
        try:
            if isinstance(line, DataError):
                raise line
            obj = _json_line(line, (str(path), n))
        except DataError as err:
            first_error = first_error or err
            if looked >= 100:
                raise first_error from None
            continue
        return record_format(obj, (str(path), n))
    if first_error is not None:
        raise first_error
    raise DataError(str(path), None, None, "empty file: no records")


PARSERS = {"canonical": parse_canonical, "redheart": parse_redheart, "scruples": parse_scruples}


def _json_array_records(path: Path, items: list[Any], parse: Callable, report: FileReport,
                        skip_bad: bool) -> Iterator[Record]:
    """The records of a JSON array (errors name the item's index, from 0)."""
    report.lines = len(items)
    for i, obj in enumerate(items):
        where = (f"{path} item", i)
        try:
            if not isinstance(obj, dict):
                raise DataError(*where, None, f"expected a JSON object, got {type(obj).__name__}")
            yield parse(obj, where)
        except DataError as err:
            if not skip_bad:
                raise
            _count_skip(report, err)


def load_file(path: Path, fmt: str | None, skip_bad: bool, report: FileReport) -> list[Record]:
    if fmt is not None and fmt not in FORMATS:
        raise DataError(str(path), None, None, f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt != "goemotions" and path.name.lower().endswith((".json", ".json.gz")) and _is_json_array(path):
        # one JSON array, of records in any of the JSON formats (read once, its format from it)
        items = _read_json_array(path)
        fmt = fmt or _array_format(path, items)
        it = _json_array_records(path, items, PARSERS[fmt], report, skip_bad)
    else:
        fmt = fmt or detect_format(path)
        it = (_goemotions_records(path, report, skip_bad) if fmt == "goemotions"
              else _jsonl_records(path, PARSERS[fmt], report, skip_bad))
    report.format = fmt
    out = []
    for rec in it:
        if not rec.has_target:
            report.no_target += 1
            continue
        out.append(rec)
    report.records = len(out)
    if not out and report.skipped == 0 and report.no_target == 0:
        raise DataError(str(path), None, None, "empty file: no records")
    return out


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".tsv", ".tsv.gz")


def expand_spec(spec: str) -> list[tuple[Path, str | None]]:
    """`PATH`, `FORMAT:PATH` or a folder (its data files, sorted) -> [(file, format or None)]."""
    fmt = None
    head, sep, tail = spec.partition(":")
    if sep and head in FORMATS:
        fmt, spec = head, tail
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
        files = [p for p in files if "dilemmas" not in p.name]  # evaluation set, not training data
        if not files:
            raise DataError(str(path), None, None, f"folder holds no data files ({', '.join(DATA_SUFFIXES)})")
        return [(p, fmt) for p in files]
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file or folder")
    return [(path, fmt)]


def load_records(specs: list[str], skip_bad: bool = False) -> tuple[list[Record], LoadReport]:
    """All records of the given data specs, de-duplicated by id (first one kept)."""
    report = LoadReport()
    seen: set[str] = set()
    records: list[Record] = []
    for spec in specs:
        for path, fmt in expand_spec(spec):
            fr = FileReport(path=str(path), format=fmt or "?")
            report.files.append(fr)
            for rec in load_file(path, fmt, skip_bad, fr):
                if rec.id in seen:
                    report.duplicates += 1
                    continue
                seen.add(rec.id)
                records.append(rec)
    return records, report


def sample_data_path() -> Path:
    """The English sample dataset that ships with the package."""
    return Path(str(resources.files("redheart") / "sample_data" / "sample_en.jsonl"))


@dataclass
class LoadedData:
    """The records of a run's data specs (`data.paths`, or the sample when empty), read once."""

    specs: list[str]
    skip_bad: bool
    records: list[Record]
    report: LoadReport


def data_specs(paths: list[str]) -> list[str]:
    """The data specs a run reads: `data.paths`, or the shipped sample when it is empty."""
    return list(paths) or [str(sample_data_path())]


def load_data(paths: list[str], skip_bad: bool) -> LoadedData:
    specs = data_specs(paths)
    records, report = load_records(specs, skip_bad=skip_bad)
    return LoadedData(specs, skip_bad, records, report)
