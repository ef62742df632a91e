"""Importers: canonical JSONL, the earlier Red Heart format, Scruples anecdotes, GoEmotions TSV.

Every test writes small files in the real formats into pytest's tmp_path; the public corpus is
only read (by the `corpus` test, when ../shared/data exists), never copied into the repository.
"""
from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from redheart.data.dataset import TaskData, split_of
from redheart.data.importers import (
    FileReport, detect_format, expand_spec, load_file, load_records,
)
from redheart.data.schema import BENTHAM, EMOTIONS, SURD, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Fixed element orders, spelled out here so that a change in the code cannot pass unnoticed.
EMOTION_ORDER = ["joy", "trust", "fear", "surprise", "sadness", "disgust", "anger"]
BENTHAM_ORDER = ["intensity", "duration", "certainty", "propinquity", "purity",
                 "extent", "fecundity", "remoteness", "succession", "utility"]
SURD_ORDER = ["synergy", "unique", "redundant", "deterministic"]
CERTAINTY = 2

# GoEmotions label ids (goemotions_labels.txt, id = line number from 0) and the README's grouping.
GOEMOTIONS_NAMES = [
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity",
    "desire", "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear",
    "gratitude", "grief", "joy", "love", "nervousness", "optimism", "pride", "realization", "relief",
    "remorse", "sadness", "surprise", "neutral",
]
README_GROUPS = {
    "joy": "joy amusement excitement optimism pride relief love desire",
    "trust": "admiration approval caring gratitude",
    "fear": "fear nervousness",
    "surprise": "surprise realization confusion curiosity",
    "sadness": "sadness disappointment grief embarrassment remorse",
    "disgust": "disgust",
    "anger": "anger annoyance disapproval",
}
GROUP_OF = {name: cls for cls, names in README_GROUPS.items() for name in names.split()}


def load(path, skip_bad: bool = False, fmt: str | None = None):
    return load_records([f"{fmt}:{path}" if fmt else str(path)], skip_bad=skip_bad)


def by_id(records):
    return {r.id: r for r in records}


def approx_list(values, abs=1e-9):
    return [None if v is None else pytest.approx(v, abs=abs) for v in values]


def check_error(err: DataError, path: Path, line, field: str | None):
    """The error names the file, the line and (where there is one) the field, in its message."""
    msg = str(err)
    assert err.path.startswith(str(path))
    assert str(path) in msg
    assert err.line == line
    if line is not None:
        assert f":{line}:" in msg
    if field is None:
        assert err.field is None
    else:
        assert err.field == field
        assert f"{field}:" in msg


def assert_valid(rec):
    """The invariants every loaded record must hold."""
    assert isinstance(rec.id, str) and rec.id
    assert isinstance(rec.text, str) and rec.text.strip()
    assert rec.has_target
    if rec.emotion is not None:
        assert len(rec.emotion) == 7 and all(0 <= v <= 1 for v in rec.emotion)
        assert sum(rec.emotion) == pytest.approx(1.0)
    if rec.bentham is not None:
        assert len(rec.bentham) == 10 and all(v is None or 0 <= v <= 1 for v in rec.bentham)
    if rec.regret is not None:
        assert 0 <= rec.regret <= 1
    if rec.surd is not None:
        assert len(rec.surd) == 4 and sum(rec.surd) == pytest.approx(1.0)


def test_head_orders_are_the_documented_ones():
    assert list(EMOTIONS) == EMOTION_ORDER
    assert list(BENTHAM) == BENTHAM_ORDER
    assert list(SURD) == SURD_ORDER


# =======================================================================================
# 1. Canonical JSONL

FULL = {"id": "full", "text": "I lent my car to a friend and he crashed it.",
        "emotion": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1],
        "bentham": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
        "regret": 0.4, "surd": [0.25, 0.25, 0.4, 0.1], "source": "unit"}
PARTIAL = {"id": "partial", "text": "I told the truth at work.", "emotion": None,
           "bentham": [0.2, None, 0.9, None, None, None, None, None, None, 1.0],
           "regret": 0.0, "surd": None}
ONLY_EMOTION = {"id": "emo", "text": "A quiet morning.", "emotion": {"joy": 0.5, "anger": 0.5}}


def test_canonical_valid_records_values_and_masks(write_file):
    path = write_file("data.jsonl", [FULL, PARTIAL, ONLY_EMOTION])
    assert detect_format(path) == "canonical"
    records, report = load(path)
    assert [r.id for r in records] == ["full", "partial", "emo"]
    full, partial, emo = records

    assert full.text == FULL["text"]
    assert full.emotion == approx_list(FULL["emotion"])
    assert full.bentham == approx_list(FULL["bentham"])
    assert full.regret == pytest.approx(0.4)
    assert full.surd == approx_list([0.25, 0.25, 0.4, 0.1])
    assert full.source == "unit" and full.lang == "en"

    assert partial.emotion is None and partial.surd is None
    assert partial.bentham == [0.2, None, 0.9, None, None, None, None, None, None, 1.0]
    assert partial.regret == 0.0  # a real 0, not a missing value
    assert partial.source == "canonical"

    assert emo.emotion == approx_list([0.5, 0, 0, 0, 0, 0, 0.5])
    assert emo.bentham is None and emo.regret is None and emo.surd is None

    assert report.records == 3 and report.skipped == 0 and report.duplicates == 0
    assert report.files[0].format == "canonical" and report.files[0].lines == 3

    # Masks: every missing target is masked out, per element for bentham.
    data = TaskData(records, [[1, 2]] * 3)
    assert data.emotion_mask.tolist() == [True, False, True]
    assert data.regret_mask.tolist() == [True, True, False]
    assert data.surd_mask.tolist() == [True, False, False]
    assert data.bentham_mask.tolist() == [
        [True] * 10,
        [True, False, True, False, False, False, False, False, False, True],
        [False] * 10,
    ]
    assert data.bentham[1].tolist() == pytest.approx([0.2, 0, 0.9, 0, 0, 0, 0, 0, 0, 1.0])
    assert data.regret.tolist() == pytest.approx([0.4, 0.0, 0.0])
    assert data.head_counts() == {"emotion": 2, "bentham": 13, "regret": 2, "surd": 1}


def test_canonical_near_one_sum_is_renormalised_and_far_sum_is_not(write_file):
    ok = write_file("ok.jsonl", [{"id": "a", "text": "t", "emotion": [0.51, 0.5, 0, 0, 0, 0, 0]}])
    (rec,), _ = load(ok)
    assert sum(rec.emotion) == pytest.approx(1.0, abs=1e-12)
    assert rec.emotion[0] == pytest.approx(0.51 / 1.01)
    bad = write_file("bad.jsonl", [{"id": "a", "text": "t", "emotion": [0.55, 0.5, 0, 0, 0, 0, 0]}])
    with pytest.raises(DataError, match="sum to 1.0500"):
        load(bad)


def test_canonical_without_id_gets_a_stable_id_and_korean_is_detected(write_file):
    rec = {"text": "오늘은 기분이 좋다", "regret": 0.25}
    a = write_file("a.jsonl", [rec])
    b = write_file("b.jsonl", ["", rec])
    (ra,), _ = load(a)
    (rb,), _ = load(b)
    assert ra.id == rb.id and ra.id.startswith("rec-") and len(ra.id) == 4 + 16
    assert ra.lang == "ko" and ra.regret == 0.25


def test_canonical_record_without_any_target_is_counted_not_loaded(write_file):
    path = write_file("d.jsonl", [FULL, {"id": "none", "text": "no labels", "emotion": None,
                                         "bentham": [None] * 10, "regret": None}])
    records, report = load(path)
    assert [r.id for r in records] == ["full"]
    assert report.files[0].no_target == 1 and report.skipped == 0


def _line(**changes):
    rec = {"id": "bad", "text": "a bad record", "emotion": None, "bentham": None,
           "regret": 0.5, "surd": None}
    rec.update(changes)
    return json.dumps(rec)


# (case, the bad line, the field the error names (None: the whole line), a part of the message)
BAD_CANONICAL = [
    ("malformed JSON", '{"id": "bad", "text": "x", "regret": 0.5', None, "malformed JSON"),
    ("malformed JSON, single quotes", "{'id': 'bad', 'text': 'x'}", None, "malformed JSON"),
    ("not an object", "[1, 2, 3]", None, "expected a JSON object"),
    ("emotion length 6", _line(emotion=[0.2] * 5 + [0.0]), "emotion", "expected 7 values"),
    ("emotion length 8", _line(emotion=[0.125] * 8), "emotion", "expected 7 values"),
    ("bentham length 9", _line(bentham=[0.5] * 9), "bentham", "expected 10 values"),
    ("surd length 3", _line(surd=[0.5, 0.25, 0.25]), "surd", "expected 4 values"),
    ("emotion not a list", _line(emotion="joy"), "emotion", "expected a list of 7 numbers"),
    ("regret above 1", _line(regret=1.5), "regret", "outside [0, 1]"),
    ("regret below 0", _line(regret=-0.1), "regret", "outside [0, 1]"),
    ("bentham element above 1", _line(bentham=[0.5, 1.2] + [None] * 8), "bentham.duration",
     "outside [0, 1]"),
    ("bentham element on a 0-10 scale", _line(bentham=[7] + [None] * 9), "bentham.intensity",
     "outside [0, 1]"),
    ("bentham unknown key", _line(bentham={"pleasure": 0.5}), "bentham", "unknown Bentham keys"),
    ("emotion sums to 1.5", _line(emotion=[0.5, 0.5, 0.5, 0, 0, 0, 0]), "emotion", "sum to 1.5000"),
    ("surd sums to 0.5", _line(surd=[0.25, 0.25, 0, 0]), "surd", "sum to 0.5000"),
    ("emotion all zero", _line(emotion=[0] * 7), "emotion", "all values are zero"),
    ("negative share in surd", _line(surd=[0.5, 0.6, -0.1, 0.0]), "surd", "negative share"),
    ("negative share in emotion", _line(emotion=[1.2, -0.2, 0, 0, 0, 0, 0]), "emotion",
     "negative share"),
    ("empty text", _line(text=""), "text", "empty text"),
    ("blank text", _line(text=" \t "), "text", "empty text"),
    ("text a number", _line(text=42), "text", "expected a string"),
    ("text a list", _line(text=["a", "b"]), "text", "expected a string"),
    ("text null", _line(text=None), "text", "expected a string"),
    ("text with NUL", _line(text="a\u0000b"), "text", "NUL"),
    ("text missing", json.dumps({"id": "bad", "regret": 0.5}), "text", "missing"),
    ("id empty", _line(id=""), "id", "non-empty string"),
    ("id a float", _line(id=1.5), "id", "non-empty string"),
    ("source a number", _line(source=3), "source", "expected a string"),
    ("unknown field", _line(colour="red"), "colour", "unknown field, of no known format"),
    ("boolean regret", _line(regret=True), "regret", "expected a number, got True"),
    ("boolean in emotion", _line(emotion=[False, 1, 0, 0, 0, 0, 0]), "emotion[0]",
     "expected a number, got False"),
    ("boolean in bentham", _line(bentham=[None, None, True] + [None] * 7), "bentham.certainty",
     "expected a number"),
    ("string number", _line(regret="0.5"), "regret", "expected a number, got '0.5'"),
    ("NaN regret", '{"id": "bad", "text": "x", "regret": NaN}', "regret", "not a finite number"),
    ("Infinity in bentham", '{"id": "bad", "text": "x", "bentham": [0, 0, Infinity, 0, 0, 0, 0, 0, 0, 0]}',
     "bentham.certainty", "not a finite number"),
    ("-Infinity in emotion", '{"id": "bad", "text": "x", "emotion": [1, -Infinity, 0, 0, 0, 0, 0]}',
     "emotion[1]", "not a finite number"),
    ("1e999 regret", '{"id": "bad", "text": "x", "regret": 1e999}', "regret", "not a finite number"),
    ("integer too large for a float", '{"id": "bad", "text": "x", "regret": 1' + "0" * 400 + "}",
     "regret", "not a finite number"),
    ("integer of too many digits", '{"id": "bad", "text": "x", "regret": ' + "9" * 5000 + "}",
     None, "malformed JSON"),
    ("unpaired surrogate in text", '{"id": "bad", "text": "a\\ud800b", "regret": 0.5}', "text",
     "surrogate"),
    ("unpaired surrogate in id", '{"id": "b\\udc00", "text": "x", "regret": 0.5}', "id", "surrogate"),
    ("nested too deeply", '{"id": "bad", "text": "x", "emotion": ' + "[" * 100_000 + "]" * 100_000 + "}",
     None, "malformed JSON"),
]


@pytest.mark.parametrize("case,line,field,fragment", BAD_CANONICAL, ids=[c[0] for c in BAD_CANONICAL])
def test_canonical_bad_line_names_file_line_and_field(write_file, case, line, field, fragment):
    path = write_file("bad.jsonl", [FULL, "", line, PARTIAL])  # the bad record is on line 3
    with pytest.raises(DataError) as exc:
        load(path)
    check_error(exc.value, path, 3, field)
    assert fragment in exc.value.message
    # With skip_bad the two good records load, the bad one is counted with its reason.
    records, report = load(path, skip_bad=True)
    assert [r.id for r in records] == ["full", "partial"]
    fr = report.files[0]
    assert fr.skipped == 1 and report.skipped == 1
    assert sum(fr.reasons.values()) == 1
    (reason,) = fr.reasons
    assert reason.startswith(f"{field or 'line'}: ")
    assert fr.first_errors == [str(exc.value)]


def test_canonical_truncated_last_line(write_file):
    text = "".join(json.dumps(r) + "\n" for r in (FULL, PARTIAL))
    cut = json.dumps(ONLY_EMOTION)[:25]  # the file ends in the middle of its third record
    path = write_file("cut.jsonl", text + cut)
    with pytest.raises(DataError) as exc:
        load(path)
    check_error(exc.value, path, 3, None)
    assert "malformed JSON" in exc.value.message
    records, report = load(path, skip_bad=True)
    assert [r.id for r in records] == ["full", "partial"] and report.skipped == 1


def test_canonical_non_utf8_line_names_its_own_line(write_file):
    good = [json.dumps({"id": f"r{i}", "text": "héllo wörld " * 10, "regret": 0.5},
                       ensure_ascii=False) for i in range(2000)]
    raw = "\n".join(good).encode("utf-8").split(b"\n")
    raw[1500] = raw[1500].replace("é".encode(), b"\xe9", 1)  # a Latin-1 byte on line 1501
    path = write_file("latin1.jsonl", b"\n".join(raw) + b"\n")
    with pytest.raises(DataError) as exc:
        load(path)
    check_error(exc.value, path, 1501, None)
    assert "not UTF-8" in exc.value.message
    records, report = load(path, skip_bad=True)
    assert len(records) == 1999 and "r1500" not in by_id(records) and report.skipped == 1


def test_canonical_byte_order_mark_and_crlf_are_accepted(write_file):
    content = "\ufeff" + json.dumps(FULL) + "\r\n" + json.dumps(PARTIAL) + "\r\n"
    path = write_file("bom.jsonl", content)
    records, _ = load(path)
    assert [r.id for r in records] == ["full", "partial"]


def test_canonical_skip_bad_loads_good_records_and_counts_each_reason(write_file):
    bad_lines = [c[1] for c in BAD_CANONICAL]
    lines = []
    for i, bad in enumerate(bad_lines):
        lines.append({"id": f"good{i}", "text": f"good record {i}", "regret": i / 100})
        lines.append(bad)
    lines.insert(0, "{ not json at all")  # a bad first line must not stop format detection
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    text += '{"id": "last", "text": "cut off'  # and a truncated last line
    path = write_file("mixed.jsonl", text)

    with pytest.raises(DataError) as exc:  # without skip_bad: the first bad line stops it
        load(path)
    check_error(exc.value, path, 1, None)

    records, report = load(path, skip_bad=True)
    n_bad = len(bad_lines) + 2
    assert [r.id for r in records] == [f"good{i}" for i in range(len(bad_lines))]
    assert [r.regret for r in records] == approx_list([i / 100 for i in range(len(bad_lines))])
    for r in records:  # nothing defaulted: the good records carry only what they gave
        assert r.emotion is None and r.bentham is None and r.surd is None
    fr = report.files[0]
    assert fr.skipped == n_bad and report.skipped == n_bad and report.records == len(bad_lines)
    assert sum(fr.reasons.values()) == n_bad
    malformed = sum(c[3] == "malformed JSON" for c in BAD_CANONICAL)
    assert fr.reasons["line: malformed JSON"] == malformed + 2  # + the first and the last line
    assert fr.reasons["text: empty text"] == 2
    assert fr.reasons["text: expected a string, got int"] == 1
    assert fr.reasons["line: expected a JSON object, got list"] == 1
    for field in ("regret", "emotion", "surd", "text", "id"):
        assert (sum(v for k, v in fr.reasons.items() if k.startswith(f"{field}: "))
                == sum(c[2] == field for c in BAD_CANONICAL)), field
    assert len(fr.first_errors) == 5 and fr.first_errors[0].startswith(f"{path}:1: ")
    assert fr.lines == 2 * len(bad_lines) + 2


# =======================================================================================
# 2. The earlier LLM-labelled Red Heart format

LEGACY = [
    {"id": "rh1", "text": "I skipped my sister's wedding to finish a work project.",
     "emotions": [2.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
     "bentham_scores": {"intensity": 0.8, "utility": 0.2},
     "regret_factor": 0.6, "surd": [0.1, 0.2, 0.3, 0.4]},
    {"id": "rh2", "situation": "I returned a wallet I found.",
     "emotions": [0.1, 0.6, 0.0, 0.1, 0.0, 0.0, 0.2],
     "bentham_scores": {"Intensity": 0.3, "Duration": 0.1, "certainty": 0.9, "propinquity": 0.5,
                        "purity": 0.7, "extent": 0.2, "fecundity": 0.4, "remoteness": 0.6,
                        "succession": 0.3, "utility": 0.95},
     "regret_factor": 0.05, "surd": {"unique": 0.5, "synergy": 0.5}},
    {"id": "rh3", "text": "Only a regret factor here.", "regret_factor": 0.3},
]


def _check_legacy(records):
    rh1, rh2, rh3 = records
    assert rh1.emotion == approx_list([0.5, 0.25, 0, 0, 0.25, 0, 0])
    assert rh1.bentham == [pytest.approx(0.8)] + [None] * 8 + [pytest.approx(0.2)]
    assert 0.5 not in rh1.bentham  # missing keys are missing, not a neutral 0.5
    assert rh1.regret == pytest.approx(0.6)
    assert rh1.surd == approx_list([0.1, 0.2, 0.3, 0.4])
    assert rh1.source == "redheart-llm"

    assert rh2.text == "I returned a wallet I found."
    assert rh2.emotion == approx_list([0.1, 0.6, 0.0, 0.1, 0.0, 0.0, 0.2])
    assert rh2.bentham == approx_list([0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.4, 0.6, 0.3, 0.95])
    assert rh2.surd == approx_list([0.5, 0.5, 0.0, 0.0])

    assert rh3.emotion is None and rh3.bentham is None and rh3.surd is None
    assert rh3.regret == pytest.approx(0.3)


def test_legacy_jsonl(write_file):
    path = write_file("old.jsonl", LEGACY)
    assert detect_format(path) == "redheart"
    records, report = load(path)
    assert [r.id for r in records] == ["rh1", "rh2", "rh3"]
    _check_legacy(records)
    assert report.files[0].format == "redheart"


@pytest.mark.parametrize("name", ["old.json", "old.json.gz"])
def test_legacy_json_array(write_file, name):
    path = write_file(name, json.dumps(LEGACY, indent=2))
    assert detect_format(path) == "redheart"
    records, report = load(path)
    assert [r.id for r in records] == ["rh1", "rh2", "rh3"]
    _check_legacy(records)
    assert report.files[0].lines == 3


@pytest.mark.parametrize("i", range(7))
def test_legacy_emotion_order(write_file, i):
    scores = [0.0] * 7
    scores[i] = 3.0
    path = write_file("one.jsonl", [{"text": "t", "emotions": scores}])
    (rec,), _ = load(path)
    assert rec.emotion[i] == 1.0 and sum(rec.emotion) == 1.0
    assert EMOTION_ORDER[rec.emotion.index(1.0)] == [
        "joy", "trust", "fear", "surprise", "sadness", "disgust", "anger"][i]


def test_legacy_missing_bentham_keys_are_none_for_every_subset(write_file):
    lines = []
    for k in range(10):
        lines.append({"id": f"k{k}", "text": f"record {k}", "bentham_scores": {BENTHAM_ORDER[k]: 0.1 * k}})
    path = write_file("subsets.jsonl", lines)
    records, _ = load(path)
    assert len(records) == 10
    for k, rec in enumerate(records):
        expect = [None] * 10
        expect[k] = pytest.approx(0.1 * k)
        assert rec.bentham == expect
        assert rec.emotion is None and rec.regret is None and rec.surd is None
    data = TaskData(records, [[1]] * 10)
    assert data.bentham_mask.sum().item() == 10
    assert data.bentham_mask.diagonal().all()


BAD_LEGACY = [
    ("all-zero emotions", {"text": "t", "emotions": [0] * 7}, "emotions", "all values are zero"),
    ("emotions length 6", {"text": "t", "emotions": [1] * 6}, "emotions", "expected 7 values"),
    ("emotions a string", {"text": "t", "emotions": "joy"}, "emotions", "expected a list or mapping"),
    ("negative emotion", {"text": "t", "emotions": [1, -1, 0, 0, 0, 0, 1]}, "emotions", "negative"),
    ("boolean emotion", {"text": "t", "emotions": [True, 0, 0, 0, 0, 0, 0]}, "emotions[0]",
     "expected a number"),
    ("bentham on 0-10 scale", {"text": "t", "bentham_scores": {"intensity": 8}},
     "bentham_scores.intensity", "outside [0, 1]"),
    ("bentham unknown key", {"text": "t", "bentham_scores": {"pleasure": 0.4}}, "bentham_scores",
     "unknown Bentham keys"),
    ("bentham a number", {"text": "t", "bentham_scores": 0.5}, "bentham_scores",
     "expected a list or mapping"),
    ("regret above 1", {"text": "t", "regret_factor": 1.2}, "regret_factor", "outside [0, 1]"),
    ("surd not summing to 1", {"text": "t", "regret_factor": 0.1, "surd": [0.5, 0.1, 0.1, 0.1]},
     "surd", "sum to"),
    ("surd unknown key", {"text": "t", "regret_factor": 0.1, "surd": {"luck": 1.0}}, "surd",
     "unknown keys"),
    ("no text", {"emotions": [1, 0, 0, 0, 0, 0, 0]}, "text", "missing"),
    ("empty situation", {"situation": "  ", "regret_factor": 0.1}, "situation", "empty text"),
    ("huge scores", {"text": "t", "emotions": [1e308, 1e308, 0, 0, 0, 0, 0]}, "emotions",
     "not a finite number"),
]


@pytest.mark.parametrize("case,obj,field,fragment", BAD_LEGACY, ids=[c[0] for c in BAD_LEGACY])
def test_legacy_bad_record_jsonl_and_json(write_file, case, obj, field, fragment):
    good = LEGACY[0]
    path = write_file("bad.jsonl", [good, obj])
    with pytest.raises(DataError) as exc:
        load(path, fmt="redheart")
    check_error(exc.value, path, 2, field)
    assert fragment in exc.value.message
    records, report = load(path, fmt="redheart", skip_bad=True)
    assert [r.id for r in records] == ["rh1"] and report.skipped == 1

    # The same as one JSON array: the error names the item (from 0).
    apath = write_file("bad.json", json.dumps([good, obj]))
    with pytest.raises(DataError) as exc:
        load(apath)
    assert exc.value.path == f"{apath} item" and exc.value.line == 1
    assert exc.value.field == field and fragment in exc.value.message
    assert f"{apath} item:1: {field}:" in str(exc.value)
    records, report = load(apath, skip_bad=True)
    assert [r.id for r in records] == ["rh1"] and report.skipped == 1


def test_legacy_all_zero_emotions_is_never_a_record_of_zeros(write_file):
    # The earlier implementation's defect: every emotion label silently 0.
    path = write_file("zeros.jsonl", [{"id": f"z{i}", "text": f"t{i}", "emotions": [0.0] * 7,
                                       "regret_factor": 0.5} for i in range(3)])
    with pytest.raises(DataError, match="all values are zero"):
        load(path)
    records, report = load(path, skip_bad=True)
    assert records == [] and report.skipped == 3
    assert report.files[0].reasons == Counter({"emotions: all values are zero: not a distribution": 3})


def test_legacy_json_file_errors(write_file):
    bad = write_file("broken.json", '[\n  {"text": "a", "regret_factor": 0.5},\n  {"text": \n')
    with pytest.raises(DataError) as exc:
        load(bad)
    assert exc.value.path == str(bad) and exc.value.line == 4 and "malformed JSON" in str(exc.value)
    # A .json file that does not start with "[" holds JSON lines, in every format.
    obj = write_file("obj.json", '{"text": "a", "regret_factor": 0.5}')
    (rec,), report = load(obj, fmt="redheart")
    assert rec.regret == 0.5 and report.files[0].format == "redheart"
    item = write_file("items.json", json.dumps([LEGACY[0], "just a string"]))
    with pytest.raises(DataError) as exc:
        load(item)
    assert exc.value.line == 1 and "expected a JSON object" in exc.value.message
    deep = write_file("deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load(deep)
    empty = write_file("empty.json", "[]")
    with pytest.raises(DataError, match="empty file"):
        load(empty)


# =======================================================================================
# 3. Scruples anecdotes


def anecdote(rid, a, o, e, n, info=0, title="AITA for keeping the last slice?", text="Body of the post."):
    return {"id": rid, "post_id": "p" + rid, "title": title, "text": text, "action": "keeping it",
            "post_type": "HISTORICAL", "label": "AUTHOR", "binarized_label": "WRONG",
            "label_scores": {"AUTHOR": a, "OTHER": o, "EVERYBODY": e, "NOBODY": n, "INFO": info}}


def test_scruples_hand_computed(write_file):
    path = write_file("scruples_anecdotes.jsonl", [
        anecdote("s1", 0, 3, 1, 0),              # t=4:  regret 1/4,  certainty 3/4
        anecdote("s2", 5, 1, 2, 2, info=7),      # t=10: regret 7/10, certainty 5/10 (INFO ignored)
        anecdote("s3", 5, 1, 2, 2, info=0),      # the same without INFO: the same targets
        anecdote("s4", 1, 1, 1, 1, info=100),    # t=4:  regret 2/4,  certainty 1/4
        anecdote("s5", 0, 0, 0, 9),              # t=9:  regret 0,    certainty 1
    ])
    assert detect_format(path) == "scruples"
    records, report = load(path)
    got = {r.id: (r.regret, r.bentham[CERTAINTY]) for r in records}
    assert got == {
        "scruples-s1": (pytest.approx(0.25), pytest.approx(0.75)),
        "scruples-s2": (pytest.approx(0.7), pytest.approx(0.5)),
        "scruples-s3": (pytest.approx(0.7), pytest.approx(0.5)),
        "scruples-s4": (pytest.approx(0.5), pytest.approx(0.25)),
        "scruples-s5": (0.0, 1.0),
    }
    for r in records:
        assert r.text == "AITA for keeping the last slice?\nBody of the post."
        assert r.emotion is None and r.surd is None
        assert [v for i, v in enumerate(r.bentham) if i != CERTAINTY] == [None] * 9
        assert r.source == "scruples"
    assert report.files[0].format == "scruples"
    data = TaskData(records, [[1]] * 5)
    assert data.bentham_mask[:, CERTAINTY].all() and data.bentham_mask.sum().item() == 5
    assert not data.emotion_mask.any() and not data.surd_mask.any() and data.regret_mask.all()


def test_scruples_empty_body_keeps_the_title(write_file):
    path = write_file("s.jsonl", [anecdote("e", 1, 0, 0, 0, title="AITA?", text="")])
    (rec,), _ = load(path)
    assert rec.text == "AITA?\n" and rec.regret == 1.0


def _scruples_bad(change):
    rec = anecdote("bad", 1, 2, 3, 4)
    change(rec)
    return rec


BAD_SCRUPLES = [
    ("negative votes", lambda r: r["label_scores"].update(OTHER=-1), "label_scores.OTHER", "vote count"),
    ("fractional votes", lambda r: r["label_scores"].update(AUTHOR=2.5), "label_scores.AUTHOR", "vote count"),
    ("string votes", lambda r: r["label_scores"].update(EVERYBODY="3"), "label_scores.EVERYBODY",
     "vote count"),
    ("boolean votes", lambda r: r["label_scores"].update(NOBODY=True), "label_scores.NOBODY", "vote count"),
    ("null votes", lambda r: r["label_scores"].update(AUTHOR=None), "label_scores.AUTHOR", "vote count"),
    ("missing vote key", lambda r: r["label_scores"].pop("NOBODY"), "label_scores.NOBODY", "missing"),
    ("only INFO votes", lambda r: r.update(label_scores={"AUTHOR": 0, "OTHER": 0, "EVERYBODY": 0,
                                                         "NOBODY": 0, "INFO": 5}),
     "label_scores", "no AUTHOR/OTHER/EVERYBODY/NOBODY votes"),
    ("label_scores a list", lambda r: r.update(label_scores=[1, 2, 3, 4, 0]), "label_scores",
     "expected a mapping"),
    ("missing label_scores", lambda r: r.pop("label_scores"), "label_scores", "missing"),
    ("missing title", lambda r: r.pop("title"), "title", "missing"),
    ("missing text", lambda r: r.pop("text"), "text", "missing"),
    ("missing id", lambda r: r.pop("id"), "id", "missing"),
    ("title not a string", lambda r: r.update(title=7), "title", "expected a string"),
    ("text null", lambda r: r.update(text=None), "text", "expected a string"),
    ("id empty", lambda r: r.update(id=""), "id", "non-empty"),
]


@pytest.mark.parametrize("case,change,field,fragment", BAD_SCRUPLES, ids=[c[0] for c in BAD_SCRUPLES])
def test_scruples_bad_record(write_file, case, change, field, fragment):
    path = write_file("anecdotes.jsonl", [anecdote("g1", 1, 1, 0, 0), _scruples_bad(change),
                                          anecdote("g2", 0, 1, 0, 0)])
    with pytest.raises(DataError) as exc:
        load(path, fmt="scruples")
    check_error(exc.value, path, 2, field)
    assert fragment in exc.value.message
    records, report = load(path, fmt="scruples", skip_bad=True)
    assert [(r.id, r.regret) for r in records] == [("scruples-g1", 0.5), ("scruples-g2", 0.0)]
    assert report.skipped == 1


# =======================================================================================
# 4. GoEmotions TSV

EN_LINES = [
    ("I love this and I'm furious", "17,2", "c_a"),       # joy 0.5, anger 0.5
    ("Thank you, I agree", "0,4", "c_b"),                 # trust 1.0
    ("It is Tuesday.", "27", "c_c"),                      # neutral only: no target
    ("Wait, what?", "26,27", "c_d"),                      # surprise 1.0 (neutral adds nothing)
    ("So sad, scary and annoying", "25,14,3", "c_e"),     # sadness, fear, anger 1/3 each
    ("Gross.", "11", "c_f"),                              # disgust 1.0
    ("Love it, love it", "18,17,15,6", "c_g"),            # joy 2/4, trust 1/4, surprise 1/4
]
KO_LINES = [
    ("나는 이것을 사랑하고 화가 난다", "17,2"),
    ("고마워요, 동의합니다", "0,4"),
    ("오늘은 화요일입니다.", "27"),
    ("잠깐, 뭐라고?", "26,27"),
    ("LOL", "25,14,3"),  # a "translation" left in Latin letters
    ("역겨워.", "11"),
    ("정말 좋아요", "18,17,15,6"),
]
EN_EXPECT = {
    "c_a": [0.5, 0, 0, 0, 0, 0, 0.5],
    "c_b": [0, 1.0, 0, 0, 0, 0, 0],
    "c_d": [0, 0, 0, 1.0, 0, 0, 0],
    "c_e": [0, 0, 1 / 3, 0, 1 / 3, 0, 1 / 3],
    "c_f": [0, 0, 0, 0, 0, 1.0, 0],
    "c_g": [0.5, 0.25, 0, 0.25, 0, 0, 0],
}


def _tsv(rows):
    return "".join("\t".join(row) + "\n" for row in rows)


def test_goemotions_grouping_matches_the_readme_for_every_label(write_file):
    assert len(GOEMOTIONS_NAMES) == 28 and set(GROUP_OF) == set(GOEMOTIONS_NAMES) - {"neutral"}
    rows = [(f"comment number {i}", str(i), f"id{i}") for i in range(28)]
    path = write_file("goemotions_en_x.tsv", _tsv(rows))
    records, report = load(path)
    assert report.files[0].no_target == 1  # neutral (27) alone
    got = by_id(records)
    assert len(got) == 27
    for i, name in enumerate(GOEMOTIONS_NAMES[:27]):
        emo = got[f"goemotions-id{i}"].emotion
        expect = [0.0] * 7
        expect[EMOTION_ORDER.index(GROUP_OF[name])] = 1.0
        assert emo == expect, name


@pytest.mark.parametrize("gz", [False, True])
def test_goemotions_en_and_ko(write_file, gz):
    ext = ".tsv.gz" if gz else ".tsv"
    en = write_file(f"goemotions_en_dev{ext}", _tsv(EN_LINES))
    ko = write_file(f"goemotions_ko_dev{ext}", _tsv(KO_LINES))
    assert detect_format(en) == detect_format(ko) == "goemotions"

    en_recs, en_rep = load(en)
    assert en_rep.files[0].no_target == 1 and en_rep.records == 6
    got = by_id(en_recs)
    assert set(got) == {f"goemotions-{cid}" for cid in EN_EXPECT}
    for cid, expect in EN_EXPECT.items():
        r = got[f"goemotions-{cid}"]
        assert r.emotion == approx_list(expect)
        assert r.bentham is None and r.regret is None and r.surd is None
        assert r.lang == "en" and r.source == "goemotions-en"

    ko_recs, ko_rep = load(ko)
    assert ko_rep.files[0].no_target == 1 and ko_rep.records == 6
    kgot = by_id(ko_recs)
    assert set(kgot) == {f"goemotions-{cid}#ko" for cid in EN_EXPECT}
    for cid, expect in EN_EXPECT.items():
        r = kgot[f"goemotions-{cid}#ko"]
        assert r.emotion == approx_list(expect)
        assert r.source == "goemotions-ko"
        assert split_of(r.id) == split_of(f"goemotions-{cid}")
    assert kgot["goemotions-c_a#ko"].lang == "ko"
    assert kgot["goemotions-c_e#ko"].lang == "en"  # Latin letters: the encoder check sees English

    # Both together: twelve distinct records, none taken for a duplicate of another.
    both, rep = load_records([str(en), str(ko)])
    assert len(both) == 12 and rep.duplicates == 0


def test_goemotions_korean_lands_in_the_split_of_its_original(write_file):
    n = 300
    en = write_file("goemotions_en_train.tsv", _tsv((f"comment {i}", "17", f"e{i:04d}") for i in range(n)))
    ko = write_file("goemotions_ko_train.tsv", _tsv((f"댓글 {i}", "17") for i in range(n)))
    en_recs, _ = load(en)
    ko_recs, _ = load(ko)
    en_splits = [split_of(r.id) for r in en_recs]
    ko_splits = [split_of(r.id) for r in ko_recs]
    assert [r.id for r in ko_recs] == [r.id + "#ko" for r in en_recs]
    assert ko_splits == en_splits
    assert set(en_splits) == {"train", "val", "test"}  # the ids really are spread over splits


def test_goemotions_ko_without_english_file_beside(write_file):
    ko = write_file("goemotions_ko_dev.tsv", _tsv([("좋아요", "17"), ("싫어요", "2")]))
    records, _ = load(ko)
    assert [r.id for r in records] == ["goemotions-goemotions_ko_dev-1#ko", "goemotions-goemotions_ko_dev-2#ko"]
    assert [r.emotion.index(1.0) for r in records] == [0, 6]


BAD_GOEMO = [
    ("label id 28", ("text", "28", "x"), "labels", "unknown GoEmotions label id '28'"),
    ("label id -1", ("text", "-1", "x"), "labels", "unknown GoEmotions label id"),
    ("label a name", ("text", "joy", "x"), "labels", "unknown GoEmotions label id 'joy'"),
    ("superscript digit", ("text", "\u00b3", "x"), "labels", "unknown GoEmotions label id"),
    ("label of many digits", ("text", "9" * 5000, "x"), "labels", "unknown GoEmotions label id"),
    ("no labels", ("text", " ", "x"), "labels", "no label ids"),
    ("empty text", ("  ", "17", "x"), "text", "empty text"),
    ("one column", ("text only",), None, "got 1"),
    ("four columns", ("a", "17", "x", "y"), None, "got 4"),
]


@pytest.mark.parametrize("case,row,field,fragment", BAD_GOEMO, ids=[c[0] for c in BAD_GOEMO])
def test_goemotions_bad_line(write_file, case, row, field, fragment):
    path = write_file("goemotions_en_bad.tsv", _tsv([("ok", "17", "g1"), row, ("fine", "2", "g2")]))
    with pytest.raises(DataError) as exc:
        load(path)
    check_error(exc.value, path, 2, field)
    assert fragment in exc.value.message
    records, report = load(path, skip_bad=True)
    assert [r.id for r in records] == ["goemotions-g1", "goemotions-g2"] and report.skipped == 1


def test_goemotions_truncated_gz_is_a_data_error(write_file, tmp_path):
    rows = [(f"comment {i} with some words to compress", str(i % 28), f"t{i}") for i in range(3000)]
    whole = gzip.compress(_tsv(rows).encode())
    path = tmp_path / "goemotions_en_train.tsv.gz"
    path.write_bytes(whole[: len(whole) // 2])
    for skip in (False, True):
        with pytest.raises(DataError) as exc:
            load(path, skip_bad=skip)
        assert exc.value.path == str(path) and "truncated" in exc.value.message
        assert exc.value.line is not None and exc.value.line > 1
    # A Korean file whose English file beside it is truncated: the error names the English file.
    ko = write_file("goemotions_ko_train.tsv.gz", _tsv([("좋아요", "17")]))
    with pytest.raises(DataError) as exc:
        load(ko)
    assert exc.value.path == str(path)
    # Not gzip at all.
    fake = write_file("goemotions_en_fake.tsv", "x")
    fake = fake.rename(tmp_path / "goemotions_en_fake.tsv.gz")
    with pytest.raises(DataError, match="unreadable or truncated"):
        load(fake)


def test_goemotions_non_utf8_line(write_file):
    raw = _tsv([("ok", "17", "g1")]).encode() + b"caf\xe9\t17\tg2\n" + _tsv([("fine", "2", "g3")]).encode()
    path = write_file("goemotions_en_latin.tsv", raw)
    with pytest.raises(DataError) as exc:
        load(path)
    check_error(exc.value, path, 2, None)
    records, report = load(path, skip_bad=True)
    assert [r.id for r in records] == ["goemotions-g1", "goemotions-g3"] and report.skipped == 1


# =======================================================================================
# 5. Format detection, specs, de-duplication, empty files


def test_detect_format_for_every_format(write_file):
    assert detect_format(write_file("a.jsonl", [FULL])) == "canonical"
    assert detect_format(write_file("b.jsonl.gz", [FULL])) == "canonical"
    assert detect_format(write_file("c.jsonl", [LEGACY[2]])) == "redheart"
    assert detect_format(write_file("d.json", json.dumps(LEGACY))) == "redheart"
    assert detect_format(write_file("e.jsonl.gz", [anecdote("x", 1, 0, 0, 0)])) == "scruples"
    assert detect_format(write_file("f.tsv", _tsv(EN_LINES))) == "goemotions"
    assert detect_format(write_file("g.TSV.gz", _tsv(EN_LINES))) == "goemotions"
    # The first line that is a JSON object decides, past bad lines and blank ones.
    assert detect_format(write_file("h.jsonl", ["", "oops {", LEGACY[0]])) == "redheart"
    with pytest.raises(DataError, match="unknown file type") as exc:
        detect_format(write_file("i.csv", "text,label\n"))
    assert exc.value.path.endswith("i.csv")


def test_only_bad_lines_is_the_first_lines_error(write_file):
    path = write_file("allbad.jsonl", ["", "nope", "[1]"])
    with pytest.raises(DataError) as exc:
        detect_format(path)
    check_error(exc.value, path, 2, None)
    assert "malformed JSON" in exc.value.message
    with pytest.raises(DataError, match="malformed JSON"):  # no line tells the format
        load(path, skip_bad=True)
    records, report = load(path, fmt="canonical", skip_bad=True)  # a named format: all skipped
    assert records == [] and report.skipped == 2 and report.files[0].lines == 3


DILEMMA = {"id": "d1", "actions": [{"id": "a1", "description": "lying"},
                                   {"id": "a2", "description": "stealing"}],
           "gold_annotations": [3, 2], "gold_label": 0, "controversial": True}


def test_scruples_dilemmas_are_refused(write_file, tmp_path):
    path = write_file("scruples_dilemmas_dev.jsonl.gz", [DILEMMA])
    with pytest.raises(DataError, match="Scruples dilemmas are an evaluation set") as exc:
        load(path)
    check_error(exc.value, path, 1, None)
    with pytest.raises(DataError, match="Scruples dilemmas"):
        load(path, skip_bad=True)
    # In a folder the dilemmas file is left out (as are files that are not data).
    write_file("folder/scruples_dilemmas_dev.jsonl.gz", [DILEMMA])
    write_file("folder/goemotions_labels.txt", "\n".join(GOEMOTIONS_NAMES) + "\n")
    a = write_file("folder/a.jsonl", [FULL])
    b = write_file("folder/b.tsv.gz", _tsv(EN_LINES))
    c = write_file("folder/c.json", json.dumps(LEGACY))
    assert expand_spec(str(tmp_path / "folder")) == [(a, None), (b, None), (c, None)]
    records, report = load_records([str(tmp_path / "folder")])
    assert len(records) == 1 + 6 + 3
    assert [f.format for f in report.files] == ["canonical", "goemotions", "redheart"]


def test_expand_spec_with_format_prefix(write_file, tmp_path):
    path = write_file("plain.txt", [FULL, PARTIAL])
    assert expand_spec(f"canonical:{path}") == [(path, "canonical")]
    records, report = load_records([f"canonical:{path}"])
    assert [r.id for r in records] == ["full", "partial"] and report.files[0].format == "canonical"
    with pytest.raises(DataError, match="unknown file type"):
        load_records([str(path)])
    # An explicit format is obeyed: legacy keys read as canonical are refused.
    legacy = write_file("legacy.jsonl", [LEGACY[0]])
    with pytest.raises(DataError, match="emotions: a redheart target, which the canonical importer would drop"):
        load_records([f"canonical:{legacy}"])
    (rec,), _ = load_records([f"redheart:{legacy}"])
    assert rec.regret == pytest.approx(0.6)
    with pytest.raises(DataError, match="no such file or folder"):
        expand_spec(f"bogus:{path}")
    with pytest.raises(DataError, match="no such file or folder"):
        expand_spec(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="folder holds no data files"):
        expand_spec(str(tmp_path / "empty_dir"))


def test_unknown_format_name(write_file):
    path = write_file("a.jsonl", [FULL])
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_file(path, "csv", False, FileReport(str(path), "csv"))


def test_duplicates_by_id_first_kept(write_file):
    first = write_file("one.jsonl", [FULL, {**PARTIAL, "id": "full", "regret": 0.9}, PARTIAL])
    second = write_file("two.jsonl", [{**FULL, "regret": 0.1}, {"id": "new", "text": "n", "regret": 0.2}])
    records, report = load_records([str(first), str(second)])
    assert [r.id for r in records] == ["full", "partial", "new"]
    assert records[0].regret == pytest.approx(0.4) and records[0].text == FULL["text"]
    assert report.duplicates == 2
    assert [f.records for f in report.files] == [3, 2]  # per file: before de-duplication
    # The same file twice: every record of the second pass is a duplicate.
    records, report = load_records([str(first), str(first)])
    assert len(records) == 2 and report.duplicates == 4


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n \n\t\n"), ("empty.jsonl.gz", ""),
    ("empty.tsv", ""), ("blank.tsv", "\n\n"), ("empty.json", "[]"),
])
def test_empty_file_is_an_error(write_file, name, content):
    path = write_file(name, content)
    with pytest.raises(DataError, match="empty file: no records") as exc:
        load(path)
    assert exc.value.path == str(path)
    with pytest.raises(DataError, match="empty file"):
        load(path, skip_bad=True)


def test_zero_byte_gz_is_empty_not_a_crash(tmp_path):
    path = tmp_path / "zero.jsonl.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load(path)


# =======================================================================================
# 6. A record read by an importer that would drop some of its fields: refused, never lost
# (issue 27: 60 canonical records saved as one JSON array were read as the legacy format,
# which silently dropped emotion, bentham and regret; validate said ok)

CANONICAL_RECORDS = [FULL, PARTIAL, ONLY_EMOTION]
SAMPLE = Path(__file__).resolve().parents[1] / "redheart" / "sample_data" / "sample_en.jsonl"
HEADS = ("emotion", "bentham", "regret", "surd")


@pytest.mark.parametrize("name", ["records.json", "records.json.gz"])
def test_a_canonical_json_array_imports_as_canonical_with_every_head(write_file, name):
    expected, _ = load(write_file("records.jsonl", CANONICAL_RECORDS))
    array = write_file(name, json.dumps(CANONICAL_RECORDS, indent=2))
    assert detect_format(array) == "canonical"
    for fmt in (None, "canonical"):  # detected, or named as canonical:PATH
        records, report = load(array, fmt=fmt)
        assert records == expected
        assert report.files[0].format == "canonical" and report.files[0].lines == 3
    # A bad item is named by its index, as in a legacy array.
    bad = write_file("bad_" + name, json.dumps([FULL, {**PARTIAL, "regret": 1.5}]))
    with pytest.raises(DataError) as exc:
        load(bad)
    assert str(exc.value).startswith(f"{bad} item:1: regret: ")


def test_the_issue_file_sixty_sample_records_as_one_array_keep_all_four_heads(write_file):
    from redheart.config import preset
    from redheart.validate import check_data

    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()][:60]
    path = write_file("array.json", json.dumps(sample))
    records, report = load(path)
    assert len(records) == 60 and report.files[0].format == "canonical"
    for head in HEADS:
        assert all(getattr(r, head) is not None for r in records), head
    assert [r.emotion for r in records] == [approx_list(r["emotion"]) for r in sample]
    cfg = preset("tiny")
    cfg.data.paths = [str(path)]
    assert check_data(cfg) == ("ok", "60 records from 1 file(s); with targets: emotion 60, bentham 60, "
                                     "regret 60, surd 60")


SCRUPLES_ONE = anecdote("s1", 1, 2, 0, 0)
EMOTION7 = [0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1]
# (case, file name, format named or None, records, the bad item (line from 1, or array index
# from 0), the field the error names, a part of its message)
FOREIGN = [
    ("canonical emotion in a legacy array", "legacy.json", None,
     [LEGACY[0], {**LEGACY[2], "emotion": EMOTION7}], 1, "emotion", "a canonical target"),
    ("canonical bentham in legacy JSONL", "legacy.jsonl", None,
     [LEGACY[0], {**LEGACY[2], "bentham": [0.5] * 10}], 2, "bentham", "a canonical target"),
    ("canonical regret in legacy JSONL", "legacy.jsonl", None,
     [LEGACY[0], LEGACY[1], {**LEGACY[2], "regret": 0.2}], 3, "regret", "a canonical target"),
    ("legacy regret_factor in canonical JSONL", "data.jsonl", None,
     [FULL, {**PARTIAL, "regret_factor": 0.3}], 2, "regret_factor", "a redheart target"),
    ("legacy emotions in a canonical array", "data.json", None,
     [FULL, {**PARTIAL, "emotions": [1, 0, 0, 0, 0, 0, 1]}], 1, "emotions", "a redheart target"),
    ("canonical emotion in a Scruples anecdote", "scruples.jsonl", None,
     [SCRUPLES_ONE, {**anecdote("s2", 1, 0, 0, 0), "emotion": EMOTION7}], 2, "emotion", "a canonical target"),
    ("legacy bentham_scores in a Scruples anecdote", "scruples.jsonl", None,
     [{**SCRUPLES_ONE, "bentham_scores": {"utility": 0.1}}], 1, "bentham_scores", "a redheart target"),
    ("canonical records named as redheart", "data.jsonl", "redheart",
     [FULL], 1, "emotion", "a canonical target"),
    ("canonical records in an array named as redheart", "data.json", "redheart",
     [PARTIAL], 0, "emotion", "a canonical target"),  # (null, but a canonical field)
    ("legacy records named as canonical", "legacy.jsonl", "canonical",
     [LEGACY[0]], 1, "emotions", "a redheart target"),
    ("canonical records named as scruples", "data.jsonl", "scruples",
     [FULL], 1, "emotion", "a canonical target"),
    ("a target of no known format", "legacy.json", None,
     [{**LEGACY[0], "surd_metrics": {"risk": 0.5}}], 0, "surd_metrics", "unknown field, of no known format"),
    ("an unknown field in canonical", "data.jsonl", None,
     [FULL, {**PARTIAL, "colour": "red"}], 2, "colour", "unknown field, of no known format"),
    ("an unknown field in legacy", "legacy.jsonl", None,
     [{**LEGACY[1], "timestamp": "2024-01-01"}], 1, "timestamp", "unknown field, of no known format"),
    ("an unknown field in Scruples", "scruples.jsonl", None,
     [{**SCRUPLES_ONE, "upvotes": 12}], 1, "upvotes", "unknown field, of no known format"),
    ("a Scruples field in canonical", "data.jsonl", None,
     [FULL, {**PARTIAL, "label": "AUTHOR"}], 2, "label", "a field of the scruples format"),
    ("a legacy text field in canonical", "data.jsonl", None,
     [FULL, {"id": "x", "situation": "I lied.", "regret": 0.2}], 2, "situation", "a field of the redheart format"),
]


@pytest.mark.parametrize("case,name,fmt,objs,item,field,fragment", FOREIGN, ids=[c[0] for c in FOREIGN])
def test_a_field_the_importer_would_drop_is_an_error_naming_file_item_and_field(
        write_file, case, name, fmt, objs, item, field, fragment):
    array = name.endswith(".json")
    path = write_file(name, json.dumps(objs) if array else objs)
    with pytest.raises(DataError) as exc:
        load(path, fmt=fmt)
    err = exc.value
    assert (err.path, err.line, err.field) == (f"{path} item" if array else str(path), item, field)
    assert str(err).startswith(f"{path}{' item' if array else ''}:{item}: {field}: {fragment}"), str(err)
    # --skip-bad-records skips that record and counts it; the others load whole.
    records, report = load(path, fmt=fmt, skip_bad=True)
    assert report.skipped == 1 and len(records) == len(objs) - 1
    assert report.files[0].first_errors == [str(err)]


def test_a_field_that_would_be_dropped_fails_validate(write_file):
    from redheart.config import preset
    from redheart.validate import check_data

    path = write_file("mixed.jsonl", [FULL, {**PARTIAL, "regret_factor": 0.3}])
    cfg = preset("tiny")
    cfg.data.paths = [str(path)]
    status, reason = check_data(cfg)
    assert status == "fail" and f"{path}:2: regret_factor: a redheart target" in reason


# =======================================================================================
# 7. The public corpus (read-only), first 2000 lines of each file


def _head(src: Path, dst: Path, n: int = 2000) -> Path:
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as f:
        lines = [line for _, line in zip(range(n), f)]
    dst.write_bytes(gzip.compress(b"".join(lines)) if dst.suffix == ".gz" else b"".join(lines))
    return dst


@pytest.mark.corpus
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"public corpus not found at {SHARED_DATA}")
def test_public_corpus_heads_are_real_labels(tmp_path):
    started = time.monotonic()
    names = ["goemotions_en_dev.tsv.gz", "goemotions_en_train.tsv.gz", "goemotions_ko_dev.tsv.gz",
             "goemotions_ko_train.tsv.gz", "scruples_anecdotes.jsonl.gz", "scruples_dilemmas_dev.jsonl.gz"]
    missing = [n for n in names if not (SHARED_DATA / n).is_file()]
    if missing:
        pytest.skip(f"public corpus at {SHARED_DATA} lacks {missing}")
    labels = (SHARED_DATA / "goemotions_labels.txt").read_text().split()
    assert labels == GOEMOTIONS_NAMES

    heads = {n: _head(SHARED_DATA / n, tmp_path / n) for n in names}

    # GoEmotions, English and Korean: real emotion distributions, nothing else.
    for split in ("dev", "train"):
        en, en_rep = load(heads[f"goemotions_en_{split}.tsv.gz"])
        ko, ko_rep = load(heads[f"goemotions_ko_{split}.tsv.gz"])
        for recs, rep in ((en, en_rep), (ko, ko_rep)):
            fr = rep.files[0]
            assert fr.lines == 2000 and fr.skipped == 0
            assert 100 < fr.no_target < 1000  # neutral-only comments (about a quarter upstream)
            assert fr.records + fr.no_target == 2000
            argmax = Counter(max(range(7), key=r.emotion.__getitem__) for r in recs)
            assert len(argmax) == 7 and max(argmax.values()) < 0.6 * len(recs), argmax
            assert len({tuple(r.emotion) for r in recs}) > 20
            for r in recs:
                assert_valid(r)
                assert r.bentham is None and r.regret is None and r.surd is None
        assert all(r.id.endswith("#ko") and r.source == "goemotions-ko" for r in ko)
        assert [r.id for r in ko] == [r.id + "#ko" for r in en]  # line-aligned, same labels
        assert [r.emotion for r in ko] == [r.emotion for r in en]
        assert [split_of(r.id) for r in ko] == [split_of(r.id) for r in en]
        assert sum(r.lang == "ko" for r in ko) > 0.95 * len(ko)
        assert all(r.lang == "en" for r in en[:50])

    # Scruples anecdotes: regret and certainty from the votes, every other target missing.
    sc, sc_rep = load(heads["scruples_anecdotes.jsonl.gz"])
    assert sc_rep.files[0].format == "scruples" and len(sc) == 2000 and sc_rep.skipped == 0
    regrets = {r.regret for r in sc}
    certainties = {r.bentham[CERTAINTY] for r in sc}
    assert len(regrets) > 10 and len(certainties) > 5
    assert min(regrets) == 0.0 and max(regrets) == 1.0
    for r in sc:
        assert_valid(r)
        assert r.emotion is None and r.surd is None
        assert [v for i, v in enumerate(r.bentham) if i != CERTAINTY] == [None] * 9
        assert 0.25 <= r.bentham[CERTAINTY] <= 1.0
        assert r.id.startswith("scruples-") and "\n" in r.text
    assert 0.1 < sum(r.regret for r in sc) / len(sc) < 0.6

    # The dilemmas are refused; the folder view leaves them (and the label list) out.
    with pytest.raises(DataError, match="Scruples dilemmas"):
        load(heads["scruples_dilemmas_dev.jsonl.gz"])
    listed = [p.name for p, _ in expand_spec(str(SHARED_DATA))]
    assert set(listed) >= {n for n in names if "dilemmas" not in n}
    assert not any("dilemmas" in n or n.endswith((".txt", ".md")) for n in listed)
    assert time.monotonic() - started < 20
