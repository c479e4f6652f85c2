"""Metadata filters (docs/api.md, "Filters"): the one parser and validator of the `filter` object, and its
evaluation over a layer's items as a boolean mask, from which the allowed ids go into FAISS as an ID
selector (`indexer.core.bundle.selectors`).

Shape: `{FIELD: {OP: VALUE, ...}, ..., "any": [FILTER, ...]}`. Keys combine with AND; `any` is an OR of
filters. Operators: `eq`, `in`, `gt`/`gte`/`lt`/`lte`, `prefix`, `glob`. A value missing on an item
never matches. Time fields (`mtime`, `taken_at`) take seconds since the epoch or ISO 8601 text; a bare
date covers its whole day (`lte: "2024-06-30"` includes that day).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from indexer.core.bundle.items import BUILTIN_FIELDS, FieldValue
from indexer.core.errors import ClipsearchError

OR_KEY = "any"
OPS = ("eq", "in", "gt", "gte", "lt", "lte", "prefix", "glob")
RANGE_OPS = ("gt", "gte", "lt", "lte")
NUMBER_FIELDS = frozenset({"size", "width", "height"})
TIME_FIELDS = frozenset({"mtime", "taken_at"})
TEXT_FIELDS = frozenset({"path", "folder", "camera"})
MAX_CONDITIONS = 64  # per filter, counting every field of every alternative
MAX_IN = 1000  # values of one `in`
MAX_DEPTH = 4  # `any` inside `any` ...
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class FilterError(ClipsearchError, ValueError):
    """A filter that cannot be used; `field` names where (`category`, `any[1].path`, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"filter.{field}: {message}" if field else f"filter: {message}")
        self.field = field


@dataclass(frozen=True)
class Cond:
    """One operator on one field; `value` already checked and converted (times to epoch seconds)."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class Filter:
    """AND of `conds` and of `alternatives` (each an OR of filters)."""

    conds: tuple[Cond, ...] = ()
    alternatives: tuple[tuple[Filter, ...], ...] = ()
    key: str = "{}"  # canonical JSON of the filter as given: the cache key of its results

    @property
    def empty(self) -> bool:
        return not self.conds and not self.alternatives

    def fields(self) -> set[str]:
        out = {c.field for c in self.conds}
        for alt in self.alternatives:
            for f in alt:
                out |= f.fields()
        return out


# --- parsing --------------------------------------------------------------------------------------


def parse_filter(raw: Any, user_fields: Collection[str] | None = None) -> Filter:
    """The checked `Filter` of a JSON filter object (None or `{}`: no filter).

    `user_fields`: the user field names the bundle has; a name outside them and the built-ins is refused
    (a typo would otherwise match nothing). None skips that check.

    Raises:
        FilterError: naming the field that is wrong.
    """
    if raw is None:
        return Filter()
    counter = [0]
    parsed = _parse(raw, "", user_fields, counter, 0)
    return Filter(parsed.conds, parsed.alternatives, json.dumps(raw, sort_keys=True, default=str))


def _parse(raw: Any, where: str, user: Collection[str] | None, counter: list[int], depth: int) -> Filter:
    if not isinstance(raw, Mapping):
        raise FilterError(where, f"must be an object of field: {{operator: value}}, got {_kind(raw)}")
    conds: list[Cond] = []
    alternatives: list[tuple[Filter, ...]] = []
    for name, spec in raw.items():
        at = f"{where}.{name}" if where else str(name)
        if name == OR_KEY:
            if depth >= MAX_DEPTH:
                raise FilterError(at, f"`any` nests deeper than {MAX_DEPTH} levels")
            if not isinstance(spec, list) or not spec:
                raise FilterError(at, "must be a non-empty list of filters")
            alternatives.append(
                tuple(_parse(f, f"{at}[{i}]", user, counter, depth + 1) for i, f in enumerate(spec))
            )
            continue
        _check_field(str(name), at, user)
        conds += _parse_ops(str(name), spec, at)
        counter[0] += 1
        if counter[0] > MAX_CONDITIONS:
            raise FilterError(at, f"a filter may hold at most {MAX_CONDITIONS} field conditions")
    return Filter(tuple(conds), tuple(alternatives))


def _check_field(name: str, at: str, user: Collection[str] | None) -> None:
    if not name:
        raise FilterError(at, "a field name is empty")
    if name in BUILTIN_FIELDS or user is None or name in user:
        return
    known = ", ".join(sorted(user)[:20]) or "none"
    raise FilterError(
        at, f"unknown field; built-in: {', '.join(BUILTIN_FIELDS)}; user fields of this bundle: {known}"
    )


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _parse_ops(name: str, spec: Any, at: str) -> list[Cond]:
    if not isinstance(spec, Mapping) or not spec:
        raise FilterError(at, f"must be an object of operators ({', '.join(OPS)}), got {_kind(spec)}")
    conds = []
    for op, value in spec.items():
        if op not in OPS:
            raise FilterError(at, f"unknown operator {op!r}; use {', '.join(OPS)}")
        if op == "in":
            if not isinstance(value, list) or not value or len(value) > MAX_IN:
                raise FilterError(f"{at}.in", f"must be a list of 1 to {MAX_IN} values")
            conds.append(Cond(name, op, tuple(_operand(name, op, v, f"{at}.in") for v in value)))
        else:
            conds.append(Cond(name, op, _operand(name, op, value, f"{at}.{op}")))
    return conds


def _operand(name: str, op: str, value: Any, at: str) -> Any:
    """The checked operand: a float, a str, or for a time field a (start, end) epoch pair for eq/in."""
    text_op = op in ("prefix", "glob")
    if name in NUMBER_FIELDS or name in TIME_FIELDS:
        if text_op:
            raise FilterError(at, f"{op} applies to text fields; {name} is a number")
        if name in TIME_FIELDS:
            return _time(value, op, at)
        return _number(value, at)
    if name in TEXT_FIELDS or text_op:
        if not isinstance(value, str):
            raise FilterError(at, f"must be text, got {_kind(value)}")
        return value.rstrip("/") if name == "folder" and len(value) > 1 else value
    if isinstance(value, bool):
        return float(value)  # stored as SQLite stores booleans: 0 / 1
    if isinstance(value, int | float):
        return _number(value, at)
    if isinstance(value, str):
        return value
    raise FilterError(at, f"must be text or a number, got {_kind(value)}")


def _number(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FilterError(at, f"must be a number, got {_kind(value)}")
    return float(value)


def _time(value: Any, op: str, at: str) -> Any:
    """Epoch seconds; a bare date is its whole day: eq/in -> (start, end), lte/gt -> the next midnight."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        t = _number(value, at)
        return (t, t) if op in ("eq", "in") else t
    if not isinstance(value, str):
        raise FilterError(at, f"must be seconds since the epoch or an ISO 8601 date, got {_kind(value)}")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(at, f"{value!r} is not an ISO 8601 date or time (e.g. 2024-06-01)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    start = moment.timestamp()
    if not _DAY.match(value.strip()):
        return (start, start) if op in ("eq", "in") else start
    end = (moment + timedelta(days=1)).timestamp()
    if op in ("eq", "in"):
        return (start, end - 1e-6)
    return end if op in ("lte", "gt") else start


# --- evaluation -----------------------------------------------------------------------------------


@dataclass
class Column:
    """Every value of one field on a layer's items: item position, and the value as a number (NaN when
    it is not one) and as text (`codes` into `uniques`, -1 when it is not text). Several values of one
    item (a list field) are several entries."""

    pos: np.ndarray  # (m,) int64 positions into the table's ids
    num: np.ndarray  # (m,) float64
    codes: np.ndarray  # (m,) int64
    uniques: list[str]

    @classmethod
    def of(cls, pos: Sequence[int], values: Sequence[FieldValue | None]) -> Column:
        keep = [i for i, v in enumerate(values) if v is not None]
        vals = [values[i] for i in keep]
        num = np.array([float(v) if isinstance(v, int | float) else math.nan for v in vals], dtype=np.float64)
        index: dict[str, int] = {}
        codes = np.array(
            [index.setdefault(v, len(index)) if isinstance(v, str) else -1 for v in vals], dtype=np.int64
        )
        return cls(np.asarray(pos, np.int64)[keep], num, codes, list(index))


class Table:
    """A layer's items of one kind as columns, loaded field by field on first use (then kept)."""

    def __init__(
        self,
        ids: np.ndarray,
        builtin: Callable[[str], Sequence[FieldValue | None]],
        user: Callable[[str], Sequence[tuple[int, FieldValue]]],
    ) -> None:
        self.ids = ids  # (n,) int64, ascending
        self._builtin, self._user = builtin, user
        self._columns: dict[str, Column] = {}

    def column(self, name: str) -> Column:
        col = self._columns.get(name)
        if col is None:
            if name in BUILTIN_FIELDS:
                col = Column.of(range(len(self.ids)), self._builtin(name))
            else:
                pairs = self._user(name)
                ids = np.fromiter((i for i, _ in pairs), np.int64, len(pairs))
                pos = np.searchsorted(self.ids, ids)
                ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
                col = Column.of(pos[ok].tolist(), [v for (_, v), k in zip(pairs, ok, strict=True) if k])
            self._columns[name] = col
        return col

    def mask(self, flt: Filter) -> np.ndarray:
        """(n,) bool: the items `flt` keeps."""
        n = len(self.ids)
        out = np.ones(n, dtype=bool)
        for cond in flt.conds:
            out &= self._cond(cond)
        for alt in flt.alternatives:
            any_of = np.zeros(n, dtype=bool)
            for f in alt:
                any_of |= self.mask(f)
            out &= any_of
        return out

    def _cond(self, cond: Cond) -> np.ndarray:
        col = self.column(cond.field)
        hit = np.zeros(len(self.ids), dtype=bool)
        hit[col.pos[_entries(col, cond.op, cond.value)]] = True
        return hit


def _entries(col: Column, op: str, value: Any) -> np.ndarray:
    """(m,) bool over a column's entries."""
    if op == "in":
        out = np.zeros(len(col.pos), dtype=bool)
        for v in value:
            out |= _entries(col, "eq", v)
        return out
    if isinstance(value, tuple):  # a time span: eq/in on a time field
        span: np.ndarray = _compare(col.num, "gte", value[0]) & _compare(col.num, "lte", value[1])
        return span
    if isinstance(value, float):
        return _compare(col.num, op, value)
    return _text(col, lambda u: _text_test(u, op, value))


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": lambda a, b: a == b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _compare(num: np.ndarray, op: str, value: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        out: np.ndarray = np.asarray(_COMPARE[op](num, value), dtype=bool)  # NaN (no number): False
    return out


def _text_test(u: str, op: str, value: str) -> bool:
    if op == "prefix":
        return u.startswith(value)
    if op == "glob":
        return fnmatch.fnmatchcase(u, value)
    return bool(_COMPARE[op](u, value))


def _text(col: Column, test: Callable[[str], bool]) -> np.ndarray:
    """Entries whose text passes `test`, testing each distinct text once."""
    ok = np.fromiter((test(u) for u in col.uniques), dtype=bool, count=len(col.uniques))
    ok = np.append(ok, False)  # code -1 (not text) reads the last slot
    out: np.ndarray = ok[col.codes]
    return out


def facet_counts(table: Table, name: str, alive: np.ndarray) -> dict[FieldValue, int]:
    """Value -> number of items among `alive` ((n,) bool) having it, for field `name`."""
    col = table.column(name)
    live = alive[col.pos]
    out: dict[FieldValue, int] = {}
    is_text = col.codes >= 0
    text_codes, text_n = np.unique(col.codes[live & is_text], return_counts=True)
    out.update((col.uniques[int(c)], int(n)) for c, n in zip(text_codes, text_n, strict=True))
    nums, num_n = np.unique(col.num[live & ~is_text & ~np.isnan(col.num)], return_counts=True)
    out.update((_plain(v), int(n)) for v, n in zip(nums, num_n, strict=True))
    return out


def _plain(v: float) -> FieldValue:
    return int(v) if float(v).is_integer() else float(v)
