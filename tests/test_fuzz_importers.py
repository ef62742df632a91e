"""Property tests for the importers: whatever the bytes of a data file, loading it either returns
valid records or raises a DataError, never any other exception, and (with skip_bad) every
non-empty line is accounted for: a record, a record without targets, or a counted skip."""
from __future__ import annotations

import copy
import gzip
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redheart.data.dataset import split_of
from redheart.data.importers import detect_format, load_records
from redheart.data.schema import DataError

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------
# Valid seeds, one list per format

CANONICAL = [
    {"id": "c1", "text": "I lent my car to a friend.", "emotion": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1],
     "bentham": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], "regret": 0.4,
     "surd": [0.25, 0.25, 0.4, 0.1], "source": "unit"},
    {"id": "c2", "text": "오늘은 좋은 날", "emotion": None,
     "bentham": [0.2, None, 0.9, None, None, None, None, None, None, 1.0], "regret": 0.0, "surd": None},
    {"text": "No id here.", "emotion": {"joy": 0.5, "anger": 0.5}},
]
REDHEART = [
    {"id": "r1", "text": "I skipped a wedding.", "emotions": [2.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
     "bentham_scores": {"intensity": 0.8, "utility": 0.2}, "regret_factor": 0.6,
     "surd": [0.1, 0.2, 0.3, 0.4]},
    {"id": "r2", "situation": "I returned a wallet.", "emotions": {"Joy": 1, "Trust": 3},
     "bentham_scores": {"certainty": 0.9}, "regret_factor": 0.05, "surd": {"unique": 1.0}},
    {"text": "Only regret.", "regret_factor": 0.3},
]
SCRUPLES = [
    {"id": "s1", "post_id": "p1", "title": "AITA for eating the cake?", "text": "It was my cake.",
     "action": "eating the cake", "post_type": "HISTORICAL", "label": "OTHER", "binarized_label": "RIGHT",
     "label_scores": {"AUTHOR": 0, "OTHER": 3, "EVERYBODY": 1, "NOBODY": 0, "INFO": 0}},
    {"id": "s2", "post_id": "p2", "title": "WIBTA if I moved out?", "text": "",
     "action": "moving out", "post_type": "HYPOTHETICAL", "label": "AUTHOR", "binarized_label": "WRONG",
     "label_scores": {"AUTHOR": 5, "OTHER": 1, "EVERYBODY": 2, "NOBODY": 2, "INFO": 7}},
]
GOEMO_EN = [["I love this and I'm furious", "17,2", "ea"], ["Thank you", "0,4", "eb"],
            ["It is Tuesday.", "27", "ec"], ["So sad and scary", "25,14,3", "ed"]]
GOEMO_KO = [["나는 이것을 사랑한다", "17,2"], ["고마워요", "0,4"], ["화요일", "27"], ["LOL", "25,14,3"]]

# (file name, format, kind of content): every importer, plain and gzip-compressed.
TARGETS = [
    ("data.jsonl", "canonical", "jsonl"),
    ("data.jsonl.gz", "canonical", "jsonl"),
    ("legacy.jsonl", "redheart", "jsonl"),
    ("legacy.json", "redheart", "array"),
    ("legacy.json.gz", "redheart", "array"),
    ("data.json", "canonical", "array"),
    ("data.json.gz", "canonical", "array"),
    ("scruples_anecdotes.jsonl", "scruples", "jsonl"),
    ("scruples_anecdotes.jsonl.gz", "scruples", "jsonl"),
    ("goemotions_en_dev.tsv", "goemotions", "tsv"),
    ("goemotions_ko_dev.tsv", "goemotions", "tsv"),
    ("goemotions_en_train.tsv.gz", "goemotions", "tsv"),
]
SEEDS = {"canonical": CANONICAL, "redheart": REDHEART, "scruples": SCRUPLES}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    # The English file beside the Korean one (its ids are borrowed by the Korean records).
    (d / "goemotions_en_dev.tsv").write_text("".join("\t".join(r) + "\n" for r in GOEMO_EN))
    return d


# ---------------------------------------------------------------------------------------
# The property


def _nonblank_lines(data: bytes) -> int:
    """Lines the importers must account for: split at \\n, not blank once decoded."""
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    n = 0
    for i, raw in enumerate(pieces):
        raw = raw.rstrip(b"\r\n")
        if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            n += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            n += 1
    return n


def _check_record(rec) -> None:
    assert isinstance(rec.id, str) and rec.id
    assert split_of(rec.id) in ("train", "val", "test")  # hashes the id: valid Unicode
    assert isinstance(rec.text, str) and rec.text.strip()
    rec.text.encode("utf-8")  # valid Unicode
    assert rec.has_target
    for name, size in (("emotion", 7), ("surd", 4)):
        v = getattr(rec, name)
        if v is not None:
            assert len(v) == size and all(isinstance(x, float) and 0 <= x <= 1 for x in v), (name, v)
            assert math.isclose(sum(v), 1.0, abs_tol=1e-9), (name, v)
    if rec.bentham is not None:
        assert len(rec.bentham) == 10
        assert all(x is None or (isinstance(x, float) and 0 <= x <= 1) for x in rec.bentham)
    if rec.regret is not None:
        assert isinstance(rec.regret, float) and 0 <= rec.regret <= 1


def check_load(path, fmt: str, kind: str, data: bytes, quick: bool = False) -> None:
    """Write `data` to `path`, load it every way (format detected or named, with and without
    skip_bad; `quick`: two of the four): records or DataError, nothing else."""
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    ways = [(str(path), True), (f"{fmt}:{path}", False)] if quick else [
        (spec, skip_bad) for spec in (str(path), f"{fmt}:{path}") for skip_bad in (False, True)]
    for spec, skip_bad in ways:
        try:
            records, report = load_records([spec], skip_bad=skip_bad)
        except DataError as err:
            assert str(err).startswith(str(path)) or "goemotions_en_dev.tsv" in str(err)
            continue
        # Anything else propagates and fails the test.
        assert len({r.id for r in records}) == len(records)
        for rec in records:
            _check_record(rec)
        fr = report.files[0]
        if not skip_bad:
            assert fr.skipped == 0
        assert sum(fr.reasons.values()) == fr.skipped
        if kind in ("jsonl", "tsv") and skip_bad:
            assert fr.records + fr.no_target + fr.skipped == _nonblank_lines(data)


# ---------------------------------------------------------------------------------------
# Strategies

# An integer of more digits than Python converts (json.dumps cannot write it): _dump puts it in.
HUGE_INT = "<an integer of 5000 digits>"
# Values chosen to reach the corners of the checks (overflow, NaN, huge sums, bad Unicode).
EDGE_NUMBER_VALUES = [
    None, True, False, 0, 1, -1, 2, 7, 0.5, 1.5, -0.0, -1e-300, 5e-324, 1e308, -1e308, 10**400, -(10**400),
    float("nan"), float("inf"), float("-inf"), "0.5", "", [], {}, [0.5], HUGE_INT,
]
EDGE_STRING_VALUES = [
    "", " ", "\t\n", "\u0000", "a\u0000b", "\ud800", "x\udfff", "\udc80abc", "\ufeff", "한국어", "é", "[NAME]", 5, 1.5,
    None, True, ["a"], {"a": 1},
]
EDGE_VECTOR_VALUES = [
    [0] * 7, [1e308] * 7, [1e308, 1e308, 0, 0, 0, 0, 0], [1] * 6, [1] * 8, [0.5] * 10, [None] * 10,
    [0.25] * 4, [1, -1, 0, 1], [0.5, 0.5, float("nan"), 0], {"joy": 1e308, "anger": 1e308},
    {"JOY": 1}, {"intensity": 2}, {"": 0.5}, {"unique": 0.5}, "joy", 0.5, [], {},
]
EDGE_NUMBERS = st.sampled_from(EDGE_NUMBER_VALUES)
EDGE_STRINGS = st.sampled_from(EDGE_STRING_VALUES)
EDGE_VECTORS = st.one_of(st.sampled_from(EDGE_VECTOR_VALUES), st.lists(EDGE_NUMBERS, min_size=4, max_size=10))


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Kinds of slot in a record: (which values are slots of the kind, its edge values, their strategy)
SLOT_KINDS = {
    "number": (_is_number, EDGE_NUMBER_VALUES, EDGE_NUMBERS),
    "string": (lambda v: isinstance(v, str), EDGE_STRING_VALUES, EDGE_STRINGS),
    "vector": (lambda v: isinstance(v, (list, dict)), EDGE_VECTOR_VALUES, EDGE_VECTORS),
}
json_scalars = st.one_of(
    EDGE_NUMBERS, EDGE_STRINGS,
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=30), st.integers(), st.just(10**400), st.just(-(10**30)),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1),
    st.text(max_size=12), st.sampled_from(["", " ", "\u0000", "\ud800", "joy", "Intensity", "17,2"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=11),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(
                                ["joy", "anger", "utility", "Certainty", "AUTHOR", "INFO", "unique"])),
                                inner, max_size=5)),
    max_leaves=15,
)
KEYS = ["id", "text", "emotion", "bentham", "regret", "surd", "source", "emotions", "bentham_scores",
        "regret_factor", "situation", "title", "label_scores", "actions", "gold_annotations", "extra"]
SPECIAL_CHARS = '{}[]":,.-+eE0123456789 \t\n\r\\/nNaIfty\u0000é한\ufeff\ud800\u2028'
# Whole tokens a character edit would hardly make: numbers JSON reads but Python cannot take.
TOKENS = ["9" * 5000, "1" + "0" * 400, "NaN", "Infinity", "-Infinity", "1e999", "-0", "true", "null",
          "\\ud800", "\\u0000", "[" * 3000, "{}", "\r\n", "\n\n", "\t", "\ufeff"]
char_ops = st.lists(st.tuples(st.sampled_from(["delete", "insert", "replace"]),
                              st.floats(min_value=0, max_value=1, exclude_max=True),
                              st.one_of(st.sampled_from(SPECIAL_CHARS), st.characters(),
                                        st.sampled_from(TOKENS))),
                    min_size=1, max_size=6)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # a lone surrogate: bytes that are not UTF-8


def apply_char_ops(text: str, ops) -> str:
    for op, where, ch in ops:
        i = int(where * (len(text) + 1)) if op == "insert" else int(where * len(text))
        if op == "insert":
            text = text[:i] + ch + text[i:]
        elif text and op == "delete":
            text = text[:i] + text[i + 1:]
        elif text:
            text = text[:i] + ch + text[i + 1:]
    return text


def _leaves(node, want):
    """(container, key) of every leaf under node for which want(value) holds."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        if want(v):
            out.append((node, k))
        out.extend(_leaves(v, want))
    return out


@st.composite
def mutated_object(draw_, seed: dict):
    """A seed record with some of its JSON values replaced, deleted, added or nested edits."""
    def draw(strategy):  # a copy: later edits must not change the strategies' own lists
        return copy.deepcopy(draw_(strategy))

    obj = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "delete", "element", "add"] + ["number", "string", "vector"] * 2))
        keys = list(obj)
        if op in SLOT_KINDS:
            want, _, edge = SLOT_KINDS[op]
            slots = _leaves(obj, want)
            if slots:
                node, k = draw_(st.sampled_from(slots))  # the slot itself, not a copy
                node[k] = draw(edge)
        elif op == "set" and keys:
            obj[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "delete" and keys:
            del obj[draw(st.sampled_from(keys))]
        elif op == "add":
            obj[draw(st.sampled_from(KEYS))] = draw(json_values)
        elif op == "element":
            containers = [k for k in keys if isinstance(obj[k], (list, dict)) and obj[k]]
            if containers:
                c = obj[draw(st.sampled_from(containers))]
                slot = draw(st.integers(0, len(c) - 1))
                if isinstance(c, list):
                    c[slot] = draw(json_values)
                else:
                    c[list(c)[slot]] = draw(json_values)
    return obj


def _dump(obj, ensure_ascii: bool) -> str:
    return json.dumps(obj, ensure_ascii=ensure_ascii, allow_nan=True).replace(f'"{HUGE_INT}"', "9" * 5000)


@st.composite
def json_file_text(draw, fmt: str, kind: str):
    """A valid file of the format with some records mutated at the JSON level."""
    seeds = SEEDS[fmt]
    objs = []
    for seed in draw(st.lists(st.sampled_from(seeds), min_size=1, max_size=4)):
        objs.append(draw(mutated_object(seed)) if draw(st.integers(0, 3)) else seed)
    ascii_ = draw(st.booleans())
    if kind == "array":
        return _dump(objs, ascii_)
    return "".join(_dump(o, ascii_) + "\n" for o in objs)


@st.composite
def tsv_file_text(draw, english: bool):
    rows = [list(r) for r in (GOEMO_EN if english else GOEMO_KO)]
    labels = st.sampled_from(["", " ", ",", "27", "17,2", "28", "-1", "1,,2", "٣", "³", "²,1", "0x1", "1.0",
                              "+3", "9" * 5000, "0,4\t", "\x00", "１７"])
    cell = st.one_of(st.text(max_size=10), labels, st.sampled_from(["한국어", "\x00", "\ud800", "\ufeff"]))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cell", "labels", "add column", "drop column", "drop row", "dup row"]))
        r = draw(st.integers(0, len(rows) - 1)) if rows else None
        if r is None:
            break
        if op == "cell":
            rows[r][draw(st.integers(0, len(rows[r]) - 1))] = draw(cell)
        elif op == "labels" and len(rows[r]) > 1:
            rows[r][1] = draw(labels)
        elif op == "add column":
            rows[r].append(draw(cell))
        elif op == "drop column" and len(rows[r]) > 1:
            rows[r].pop(draw(st.integers(0, len(rows[r]) - 1)))
        elif op == "drop row":
            rows.pop(r)
        elif op == "dup row":
            rows.insert(r, list(rows[r]))
    return "".join("\t".join(r) + "\n" for r in rows)


def seed_text(fmt: str, kind: str, name: str) -> str:
    if kind == "tsv":
        rows = GOEMO_KO if "_ko_" in name else GOEMO_EN
        return "".join("\t".join(r) + "\n" for r in rows)
    if kind == "array":
        return json.dumps(SEEDS[fmt], indent=1, ensure_ascii=False)
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in SEEDS[fmt])


# ---------------------------------------------------------------------------------------
# The tests


def test_seeds_load_cleanly(fuzz_dir):
    """The unmutated seeds are valid: every importer gives records and skips nothing."""
    for name, fmt, kind in TARGETS:
        path = fuzz_dir / name
        check_load(path, fmt, kind, seed_text(fmt, kind, name).encode())
        records, report = load_records([str(path)])
        assert records and report.skipped == 0, name
    (fuzz_dir / "goemotions_en_dev.tsv").write_text("".join("\t".join(r) + "\n" for r in GOEMO_EN))


@FUZZ
@given(target=st.sampled_from(TARGETS), data=st.binary(max_size=300))
def test_random_bytes(fuzz_dir, target, data):
    name, fmt, kind = target
    check_load(fuzz_dir / name, fmt, kind, data)


@FUZZ
@given(target=st.sampled_from(TARGETS),
       text=st.text(alphabet=st.one_of(st.sampled_from(SPECIAL_CHARS), st.characters()), max_size=200))
def test_random_text(fuzz_dir, target, text):
    name, fmt, kind = target
    check_load(fuzz_dir / name, fmt, kind, _encode(text))


@FUZZ
@given(target=st.sampled_from(TARGETS), ops=char_ops)
def test_character_mutations_of_valid_files(fuzz_dir, target, ops):
    name, fmt, kind = target
    text = seed_text(fmt, kind, name)
    check_load(fuzz_dir / name, fmt, kind, _encode(apply_char_ops(text, ops)))


@FUZZ
@given(target=st.sampled_from([t for t in TARGETS if t[2] != "tsv"]), data=st.data())
def test_json_value_mutations_of_valid_records(fuzz_dir, target, data):
    name, fmt, kind = target
    text = data.draw(json_file_text(fmt, kind))
    if data.draw(st.integers(0, 3)) == 0:
        text = apply_char_ops(text, data.draw(char_ops))
    check_load(fuzz_dir / name, fmt, kind, _encode(text))


@settings(FUZZ, max_examples=200)
@given(target=st.sampled_from([t for t in TARGETS if t[2] != "tsv"]), data=st.data())
def test_edge_value_in_each_slot_of_a_valid_record(fuzz_dir, target, data):
    """One value of one valid record replaced by a value of its own kind from the edges
    (a number by a huge, infinite, boolean or string one; a text by an empty or non-Unicode one;
    a vector by a wrong, zero or overflowing one), between two valid records."""
    name, fmt, kind = target
    seeds = SEEDS[fmt]
    obj = json.loads(json.dumps(data.draw(st.sampled_from(seeds))))
    present = sorted(kind for kind, (want, _, _) in SLOT_KINDS.items() if _leaves(obj, want))
    want, _, edge = SLOT_KINDS[data.draw(st.sampled_from(present))]
    node, k = data.draw(st.sampled_from(_leaves(obj, want)))
    node[k] = copy.deepcopy(data.draw(edge))
    objs = [seeds[0], obj, seeds[-1]]
    ascii_ = data.draw(st.booleans())
    text = _dump(objs, ascii_) if kind == "array" else "".join(_dump(o, ascii_) + "\n" for o in objs)
    check_load(fuzz_dir / name, fmt, kind, _encode(text))


@FUZZ
@given(target=st.sampled_from([t for t in TARGETS if t[2] == "tsv"]), data=st.data())
def test_tsv_cell_mutations(fuzz_dir, target, data):
    name, fmt, kind = target
    text = data.draw(tsv_file_text(english="_ko_" not in name))
    check_load(fuzz_dir / name, fmt, kind, _encode(text))


@FUZZ
@given(data=st.binary(max_size=200), cut=st.floats(min_value=0, max_value=1))
def test_damaged_gzip(fuzz_dir, data, cut):
    """Truncated or corrupted .gz files: a DataError, never a zlib or EOF error."""
    for name, fmt, kind in [t for t in TARGETS if t[0].endswith(".gz")]:
        whole = gzip.compress(_encode(seed_text(fmt, kind, name)) + data)
        path = fuzz_dir / name
        path.write_bytes(whole[: int(cut * len(whole))])
        for spec in (str(path), f"{fmt}:{path}"):
            try:
                records, _ = load_records([spec], skip_bad=True)
            except DataError:
                continue
            for rec in records:
                _check_record(rec)


@pytest.mark.parametrize("name,fmt,kind", [t for t in TARGETS if t[2] != "tsv" and not t[0].endswith(".gz")])
def test_every_edge_value_in_every_slot(fuzz_dir, name, fmt, kind):
    """Exhaustive, not sampled: each edge value of the matching kind in each slot of each seed."""
    seeds = SEEDS[fmt]
    tried = 0
    for i, seed in enumerate(seeds):
        for want, values, _ in SLOT_KINDS.values():
            for slot in range(len(_leaves(json.loads(json.dumps(seed)), want))):
                for value in values:
                    obj = json.loads(json.dumps(seed))
                    node, k = _leaves(obj, want)[slot]
                    node[k] = copy.deepcopy(value)
                    objs = [*seeds[:i], obj, *seeds[i + 1:]]
                    ascii_ = tried % 2 == 0
                    text = (_dump(objs, ascii_) if kind == "array"
                            else "".join(_dump(o, ascii_) + "\n" for o in objs))
                    check_load(fuzz_dir / name, fmt, kind, _encode(text), quick=True)
                    tried += 1
    assert tried > 200


# ---------------------------------------------------------------------------------------
# No target is ever dropped (issue 27: canonical records in a JSON array were read as the
# legacy format, losing three of their four heads): records mixing the fields of several
# formats, in any container, detected or named, load with every head they carry, or fail
# naming a field the chosen importer would not read.

FORMAT_FIELDS = {  # spelled out here, not imported: the documented fields of each format
    "canonical": {"id", "text", "emotion", "bentham", "regret", "surd", "source", "votes"},
    "redheart": {"id", "text", "situation", "content", "input", "emotions", "bentham_scores", "regret_factor",
                 "surd", "source"},
    "scruples": {"id", "post_id", "title", "text", "action", "post_type", "label", "binarized_label",
                 "label_scores"},
}
# A valid value of each field that carries a target, and the heads that it gives.
TARGET_VALUES = {
    "emotion": ([0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1], {"emotion"}),
    "bentham": ([0.5] + [None] * 9, {"bentham"}),
    "regret": (0.4, {"regret"}),
    "surd": ([0.25, 0.25, 0.4, 0.1], {"surd"}),
    "emotions": ([2.0, 1.0, 0, 0, 1.0, 0, 0], {"emotion"}),
    "bentham_scores": ({"utility": 0.2}, {"bentham"}),
    "regret_factor": (0.6, {"regret"}),
    "label_scores": ({"AUTHOR": 1, "OTHER": 2, "EVERYBODY": 0, "NOBODY": 1, "INFO": 0}, {"regret", "bentham"}),
    "surd_metrics": ({"risk": 0.5}, set()),  # a target of the earliest datasets that no importer reads
}
BASES = {  # the other fields of a record of each format
    "canonical": {"text": "I lent my car to a friend.", "source": "unit"},
    "redheart": {"situation": "I skipped a wedding."},
    "scruples": {"post_id": "p", "title": "AITA?", "text": "It was my cake.", "action": "eating it",
                 "post_type": "HISTORICAL", "label": "OTHER", "binarized_label": "RIGHT"},
}


@st.composite
def mixed_records(draw):
    objs = []
    for i in range(draw(st.integers(1, 4))):
        base = draw(st.sampled_from(sorted(BASES)))
        obj = {"id": f"r{i}", **BASES[base]}
        if base == "scruples" and draw(st.integers(0, 3)):
            obj["label_scores"] = TARGET_VALUES["label_scores"][0]
        for name in draw(st.lists(st.sampled_from(sorted(TARGET_VALUES)), max_size=3, unique=True)):
            obj[name] = TARGET_VALUES[name][0]
        objs.append(obj)
    return objs


@settings(FUZZ, max_examples=150)
@given(objs=mixed_records(), container=st.sampled_from(["data.jsonl", "data.json", "data.json.gz"]),
       named=st.sampled_from([None, "canonical", "redheart", "scruples"]), skip_bad=st.booleans())
def test_records_mixing_formats_lose_no_target(fuzz_dir, objs, container, named, skip_bad):
    path = fuzz_dir / container
    text = json.dumps(objs) if container != "data.jsonl" else "".join(json.dumps(o) + "\n" for o in objs)
    path.write_bytes(gzip.compress(text.encode()) if container.endswith(".gz") else text.encode())
    fmt = named or detect_format(path)
    fits = [set(o) <= FORMAT_FIELDS[fmt] for o in objs]
    try:
        records, report = load_records([f"{named}:{path}" if named else str(path)], skip_bad=skip_bad)
    except DataError as err:
        assert not skip_bad, err
        index = err.line - (container == "data.jsonl")  # a line from 1, an array item from 0
        assert all(fits[:index]), err  # the first record that does not fit fails, or one before it
        if "missing" not in err.message:  # (else a field the format needs is missing)
            assert err.field in objs[index] and err.field not in FORMAT_FIELDS[fmt], err
        return
    loaded = {r.id.removeprefix("scruples-"): r for r in records}
    kept = 0
    for obj, fit in zip(objs, fits):
        heads = set().union(*(TARGET_VALUES[k][1] for k in obj if k in TARGET_VALUES))
        if obj["id"] not in loaded:
            assert not fit or not heads or skip_bad, obj  # skipped (and counted) or without targets
            continue
        assert fit, obj  # a record with a field its importer does not read never loads
        kept += 1
        rec = loaded[obj["id"]]
        for head in heads:
            assert getattr(rec, head) is not None, (head, obj, fmt)
    assert kept == len(records)
    fr = report.files[0]
    assert fr.records + fr.skipped + fr.no_target == len(objs)
    assert fr.skipped == sum(not f for f in fits) or skip_bad
