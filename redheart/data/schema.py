"""The canonical record and its validation.

A record carries the text and a target per head (redheart/heads.py), in the field of the head's
name; a target that is missing is `None` (for bentham, per element), and it is masked out of
losses and metrics, never filled with a value.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from redheart import heads
from redheart.heads import BENTHAM, EMOTIONS, SURD  # noqa: F401  (the names of the heads' values)

MAX_TEXT_CHARS = 200_000  # a "text" longer than this is almost surely a broken record
SUM_TOLERANCE = 0.02  # distributions must sum to 1 within this; they are then renormalised

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


class DataError(ValueError):
    """A bad input record: names the file, the line and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = path, line, field, message
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {field + ': ' if field else ''}{message}")


@dataclass
class Record:
    id: str
    text: str
    emotion: list[float] | None = None  # 7 shares summing to 1, order EMOTIONS
    bentham: list[float | None] | None = None  # 10 values in [0, 1] or None each, order BENTHAM
    regret: float | None = None  # in [0, 1]
    surd: list[float] | None = None  # 4 shares summing to 1, order SURD
    # how many people's judgements the regret and Bentham shares come from (Scruples: the
    # non-INFO votes); None where they are not vote shares. Weighs the record's loss (`vote_weights`)
    votes: int | None = None
    source: str = ""
    lang: str = "en"

    @property
    def has_target(self) -> bool:
        # getattr with a default: a head added to the table may be carried as a plain attribute
        return any(any(h.target(getattr(self, h.name, None))[1]) for h in heads.HEADS)

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "text": self.text, **{h.name: getattr(self, h.name, None) for h in heads.HEADS},
               "source": self.source}
        if self.votes is not None:
            out["votes"] = self.votes
        return out


def detect_lang(text: str) -> str:
    return "ko" if _HANGUL.search(text) else "en"


def _number(v: Any, field: str, where: tuple[str, int | None]) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(*where, field, f"expected a number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        raise DataError(*where, field, "not a finite number (integer too large)") from None
    if not math.isfinite(f):
        raise DataError(*where, field, f"not a finite number ({v!r})")
    return f


def unit_value(v: Any, field: str, where: tuple[str, int | None]) -> float:
    f = _number(v, field, where)
    if not 0.0 <= f <= 1.0:
        raise DataError(*where, field, f"value {f:g} is outside [0, 1]")
    return f


def distribution(v: Any, names: tuple[str, ...], field: str, where: tuple[str, int | None],
                 normalise_any_sum: bool = False) -> list[float]:
    """A list (or name->value mapping) of non-negative shares summing to 1.

    `normalise_any_sum` accepts any positive total (scores rather than shares) and divides by it.
    """
    if isinstance(v, dict):
        unknown = set(v) - set(names)
        if unknown:
            raise DataError(*where, field, f"unknown keys {sorted(unknown)} (expected {list(names)})")
        v = [v.get(n, 0.0) for n in names]
    if not isinstance(v, (list, tuple)):
        raise DataError(*where, field, f"expected a list of {len(names)} numbers, got {type(v).__name__}")
    if len(v) != len(names):
        raise DataError(*where, field, f"expected {len(names)} values ({', '.join(names)}), got {len(v)}")
    vals = [_number(x, f"{field}[{i}]", where) for i, x in enumerate(v)]
    if any(x < 0 for x in vals):
        raise DataError(*where, field, f"negative share in {vals}")
    total = sum(vals)
    if not math.isfinite(total):
        raise DataError(*where, field, "values too large: their sum is not a finite number")
    if total <= 0:
        raise DataError(*where, field, "all values are zero: not a distribution")
    if not normalise_any_sum and abs(total - 1.0) > SUM_TOLERANCE:
        raise DataError(*where, field, f"shares sum to {total:.4f}, expected 1")
    return [x / total for x in vals]


def value_vector(v: Any, head: heads.Head, field: str, where: tuple[str, int | None]) -> list[float | None]:
    """A `values` head's values in [0, 1] (Bentham's 10), each may be null; or a mapping with any
    subset of their names."""
    names = head.labels
    if isinstance(v, dict):
        keys = {str(k).strip().lower(): val for k, val in v.items()}
        unknown = set(keys) - set(names)
        if unknown:
            raise DataError(*where, field, f"unknown {head.label} keys {sorted(unknown)} (expected {list(names)})")
        v = [keys.get(n) for n in names]
    if not isinstance(v, (list, tuple)):
        raise DataError(*where, field, f"expected a list of {head.size} values or a mapping, got {type(v).__name__}")
    if len(v) != head.size:
        raise DataError(*where, field, f"expected {head.size} values ({', '.join(names)}), got {len(v)}")
    return [None if x is None else unit_value(x, f"{field}.{names[i]}", where) for i, x in enumerate(v)]


def head_target(v: Any, head: heads.Head, field: str, where: tuple[str, int | None]) -> Any:
    """A record's target for `head` as the canonical format gives it, checked (None: missing):
    a distribution's shares, a one-value head's value, or a `values` head's values."""
    if v is None:
        return None
    if head.kind != "values":
        return distribution(v, head.labels, field, where)
    return unit_value(v, field, where) if head.size == 1 else value_vector(v, head, field, where)


def check_text(text: Any, where: tuple[str, int | None], field: str = "text") -> str:
    if not isinstance(text, str):
        raise DataError(*where, field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(*where, field, "empty text")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(*where, field, f"text of {len(text)} characters is over the {MAX_TEXT_CHARS} limit")
    if "\x00" in text:
        raise DataError(*where, field, "text contains NUL characters")
    if not _encodable(text):
        raise DataError(*where, field, "text contains unpaired surrogate characters (not valid Unicode)")
    return text


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_id(v: Any, where: tuple[str, int | None]) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v).strip() == "":
        raise DataError(*where, "id", f"expected a non-empty string, got {v!r}")
    if isinstance(v, str) and not _encodable(v):
        raise DataError(*where, "id", "contains unpaired surrogate characters (not valid Unicode)")
    return str(v)
