"""Validation of a plan directory before any of it reaches a model.

Plans travel between people and machines, so :func:`attnopt.cost_model.plan.load_plan` treats
them as untrusted data: every field of ``plan.json`` is type-checked against the schema that
:meth:`Plan.to_json` writes, families and their configs are decoded, the params file name is
confined to the plan directory, sizes are bounded before anything is read, and the safetensors
header is checked before the tensors are materialised. Each concern is one helper raising
``ValueError`` (``FileNotFoundError`` for missing files) with a one-line message naming the
file and the field, so a bad plan never surfaces as a ``KeyError``/``TypeError`` from deep
inside the loader or, worse, as a plan that silently differs from what was saved.

This module only knows JSON and file layout; it never imports the pipeline or the API.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import struct
import typing
from typing import Any

__all__ = [
    "MAX_PARAMS_BYTES",
    "MAX_PLAN_JSON_BYTES",
    "check_budget",
    "check_entries",
    "check_params_header",
    "check_params_name",
    "check_size",
    "check_top_level",
    "content_sha256",
    "migrate",
]

#: Largest ``params.safetensors`` accepted (checked before reading): far above any fitted plan,
#: low enough that a hostile file cannot exhaust memory.
MAX_PARAMS_BYTES = 4 << 30
#: Largest ``plan.json`` accepted (checked before reading).
MAX_PLAN_JSON_BYTES = 64 << 20
#: Largest safetensors header accepted; the header is JSON parsed before any tensor is read.
MAX_HEADER_BYTES = 16 << 20
#: Largest int accepted anywhere in a plan (int64), so huge numbers cannot reach kernels.
MAX_INT = (1 << 63) - 1

#: safetensors dtype tags a plan may hold, with their element sizes.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_TENSOR_DIMS = 8

#: ``{from_version: function(data) -> data at from_version + 1}``; none exist yet, so every
#: older schema is refused naming both versions rather than guessed at.
MIGRATIONS: dict[int, typing.Callable[[dict[str, Any]], dict[str, Any]]] = {}

_NUM = "a finite number"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(path: pathlib.Path, field: str, expected: str, value: Any) -> ValueError:
    """The one error shape of this module: file, field, what was expected, what was there."""
    return ValueError(
        _one_line(f"Expected {field} in {path} to be {expected}, but got {_short(value)}. Re-save the plan.")
    )


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_INT


def is_num(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return math.isfinite(v) if isinstance(v, float) else abs(v) <= MAX_INT


def check_size(path: pathlib.Path, limit: int) -> None:
    """Refuse a file larger than ``limit`` before reading a byte of it."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"Expected {path} to be at most {limit} bytes, but it has {size} bytes. Re-save the plan."
        )


def migrate(path: pathlib.Path, data: dict[str, Any], current: int) -> dict[str, Any]:
    """Bring an older ``schema_version`` up to ``current`` through :data:`MIGRATIONS`, or refuse."""
    version = data["schema_version"]
    while version < current:
        step = MIGRATIONS.get(version)
        if step is None:
            raise ValueError(
                f"Expected plan schema version {current}, but {path} has version {version} and no "
                "migration from it exists. Re-plan with this attnopt."
            )
        data = step(data)
        version = data["schema_version"]
    return data


# Optional top-level fields: name -> (checker, description). Required ones are checked apart.
def _str_map(v: Any, value_ok) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items())


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _sites(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in v)


_TOP = {
    "versions": (lambda v: _str_map(v, lambda x: isinstance(x, str)), "an object of strings"),
    "device": (lambda v: isinstance(v, str), "a string"),
    "target": (lambda v: isinstance(v, str), "a string"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "sites": (_sites, "a list of site structures, each with a string 'name'"),
    "pareto": (
        lambda v: isinstance(v, list) and all(_str_map(p, is_num) for p in v),
        "a list of objects of numbers",
    ),
    "explanation": (lambda v: isinstance(v, str), "a string"),
    "feasible": (lambda v: isinstance(v, bool), "true or false"),
    "totals": (lambda v: _str_map(v, is_num), "an object of finite numbers"),
    "timings": (lambda v: _str_map(v, lambda x: is_num(x) and x >= 0), "an object of non-negative numbers"),
    "parts": (_str_list, "a list of strings"),
    "steps": (_str_list, "a list of strings"),
    "modules": (lambda v: _str_map(v, lambda x: isinstance(x, dict)), "an object of objects"),
}
REQUIRED = ("schema_version", "budget", "fingerprint", "entries", "files")
KNOWN_TOP = set(_TOP) | set(REQUIRED)
_FILES = {"params", "params_sha256", "plan_sha256"}


def check_top_level(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Every top-level field present where required, of its schema type, and nothing unknown.

    Unknown fields are refused rather than ignored: the schema version is what announces new
    fields, so an unknown one means a damaged file or one this loader would misread.
    """
    unknown = sorted(set(data) - KNOWN_TOP)
    if unknown:
        raise ValueError(
            f"Expected only known fields in {path}, but got unknown {_short(unknown)}. Re-save the plan."
        )
    for name, (ok, expected) in _TOP.items():
        if name in data and not ok(data[name]):
            raise fail(path, name, expected, data[name])
    if not isinstance(data["entries"], list) or not all(isinstance(e, dict) for e in data["entries"]):
        raise fail(path, "entries", "a list of objects", data["entries"])
    files = data["files"]
    if not isinstance(files, dict):
        raise fail(path, "files", "an object", files)
    if set(files) - _FILES or "params_sha256" not in files:
        raise fail(path, "files", f"an object with params_sha256 and only {sorted(_FILES)}", sorted(files))
    for key in ("params_sha256", "plan_sha256"):
        v = files.get(key, "0" * 64)
        if not (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
            raise fail(path, f"files.{key}", "a 64-digit lowercase hex SHA-256", v)


_BUDGET_FIELDS = {
    "speedup": lambda v: v is None or is_num(v),
    "latency_ms": lambda v: v is None or is_num(v),
    "max_error": lambda v: v is None or is_num(v),
    "metric": lambda v: isinstance(v, str),
    "scope": lambda v: isinstance(v, str),
}


def check_budget(path: pathlib.Path, raw: Any):
    """Decode ``budget`` into a :class:`Budget`, turning its own ``TypeError``s into one sentence."""
    from attnopt.cost_model.budget import Budget

    if not isinstance(raw, dict) or set(raw) != {"version", "fields"} or not isinstance(raw["fields"], dict):
        raise fail(path, "budget", "an object with exactly 'version' and 'fields'", raw)
    if not is_int(raw["version"]):
        raise fail(path, "budget.version", "an integer", raw["version"])
    for k, v in raw["fields"].items():
        if k not in _BUDGET_FIELDS:
            raise fail(path, "budget.fields", f"keys among {sorted(_BUDGET_FIELDS)}", k)
        if not _BUDGET_FIELDS[k](v):
            raise fail(path, f"budget.fields.{k}", "a finite number or null" if k[0] != "m" or k == "max_error"
                       else "a string", v)  # fmt: skip
    try:
        return Budget.from_json(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(_one_line(f"Expected a valid budget in {path}, but it is refused: {e}")) from e


def _optional_nonneg(v: Any) -> bool:
    return v is None or (is_num(v) and v >= 0)


_ENTRY = {
    "site": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "family": (lambda v: isinstance(v, str), "a string"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "param_keys": (_str_list, "a list of strings"),
    "error": (lambda v: is_num(v) and v >= 0, "a non-negative finite number"),
    "predicted_s": (_optional_nonneg, "a non-negative finite number or null"),
    "measured_s": (_optional_nonneg, "a non-negative finite number or null"),
    "exact_predicted_s": (_optional_nonneg, "a non-negative finite number or null"),
    "exact_measured_s": (_optional_nonneg, "a non-negative finite number or null"),
    "cosine": (lambda v: v is None or (is_num(v) and -1.0001 <= v <= 1.0001), "a number in [-1, 1] or null"),
    "notes": (lambda v: isinstance(v, str), "a string"),
    "decode": (lambda v: v in ("exact", "family"), "'exact' or 'family'"),
    "min_len": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "end_to_end": (lambda v: v is None or is_num(v), "a finite number or null"),
}
REQUIRED_ENTRY = ("site", "family", "config", "param_keys", "error")
#: Entry fields that may be null: an unmeasured number (see :func:`finite_for_saving`).
_OPTIONAL_ENTRY_NUMBERS = frozenset(k for k, (ok, _) in _ENTRY.items() if ok(None))


def check_missing(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Name every absent required field at once (top level and per entry)."""
    missing = [k for k in REQUIRED if k not in data]
    entries = data.get("entries", [])
    if isinstance(entries, list):
        missing += [
            f"entries[{i}].{k}"
            for i, e in enumerate(entries)
            if isinstance(e, dict)
            for k in REQUIRED_ENTRY
            if k not in e
        ]
    if missing:
        raise ValueError(f"Expected a complete plan in {path}, but it lacks {missing}. Re-save the plan.")


def check_entries(path: pathlib.Path, entries: list[dict[str, Any]]) -> None:
    """Each entry: schema types, unique site, a known family whose config decodes, canonical keys."""
    seen: set[str] = set()
    for i, e in enumerate(entries):
        unknown = sorted(set(e) - set(_ENTRY))
        if unknown:
            raise fail(path, f"entries[{i}]", f"an entry with only {sorted(_ENTRY)}", unknown)
        for k, (ok, expected) in _ENTRY.items():
            if k in e and not ok(e[k]):
                raise fail(path, f"entries[{i}].{k}", expected, e[k])
        if e["site"] in seen:
            raise fail(path, f"entries[{i}].site", "a site not planned twice", e["site"])
        seen.add(e["site"])
        want = [f"{e['site']}/{j}" for j in range(len(e["param_keys"]))]
        if e["param_keys"] != want:
            raise fail(
                path,
                f"entries[{i}].param_keys",
                f"{_short(want)} (the site's keys in order)",
                e["param_keys"],
            )
        check_config(path, i, e["family"], e["config"])


def _matches(v: Any, hint: Any) -> bool:
    """Whether JSON value ``v`` fits the config field annotation ``hint`` (tuples as lists)."""
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return is_int(v)
    if hint is float:
        return is_num(v)
    if hint is str:
        return isinstance(v, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(v, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(x, args[0]) for x in v)
        return len(v) == len(args) and all(_matches(x, a) for x, a in zip(v, args))
    if args and type(None) in args:
        return v is None or any(_matches(v, a) for a in args if a is not type(None))
    return True  # an annotation this checker does not know: leave it to the config itself


def check_config(path: pathlib.Path, i: int, family: str, config: dict[str, Any]) -> None:
    """A known family, and a config that is that family's JSON and decodes with its config_type."""
    from attnopt.replacements.base import FAMILY_NAMES, get_family

    where = f"entries[{i}].config"
    if family not in FAMILY_NAMES:
        raise fail(path, f"entries[{i}].family", f"one of {list(FAMILY_NAMES)}", family)
    if set(config) != {"family", "version", "fields"} or not isinstance(config["fields"], dict):
        raise fail(path, where, "an object with exactly 'family', 'version' and 'fields'", sorted(config))
    if config["family"] != family:
        raise fail(path, f"{where}.family", f"{family!r} (the entry's family)", config["family"])
    if not is_int(config["version"]):
        raise fail(path, f"{where}.version", "an integer", config["version"])
    cls = get_family(family).config_type
    hints = {
        k: v for k, v in typing.get_type_hints(cls).items() if typing.get_origin(v) is not typing.ClassVar
    }
    for k, v in config["fields"].items():
        if k not in hints:
            raise fail(path, f"{where}.fields", f"fields of {family!r} among {sorted(hints)}", k)
        if not _matches(v, hints[k]):
            raise fail(path, f"{where}.fields.{k}", f"of type {getattr(hints[k], '__name__', hints[k])}", v)
    try:
        cls.from_json(config)
    except Exception as e:  # noqa: BLE001 - any failure of a family's own decoder is a bad plan
        raise ValueError(
            _one_line(
                f"Expected entries[{i}].config in {path} to decode as a {family!r} config, but it fails: {e}"
            )
        ) from e


def check_params_name(path: pathlib.Path, directory: pathlib.Path, name: Any) -> pathlib.Path:
    """The params file: a plain file name inside the plan directory, never a path out of it."""
    field = "files.params"
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise fail(path, field, "a file name", name)
    if (
        "/" in name
        or "\\" in name
        or os.sep in name
        or "\x00" in name
        or pathlib.PurePath(name).is_absolute()
    ):
        raise fail(path, field, "a plain file name inside the plan directory (no path separators)", name)
    target = directory / name
    if target.is_symlink():
        resolved, root = target.resolve(), directory.resolve()
        if resolved.parent != root and root not in resolved.parents:
            raise fail(
                path, field, "a file inside the plan directory, not a link out of it", f"{name} -> {resolved}"
            )
    if not target.is_file():
        raise FileNotFoundError(
            f"Expected the plan's tensors at {target}, but the file is missing. Re-save the plan."
        )
    check_size(target, MAX_PARAMS_BYTES)
    return target


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(data: dict[str, Any], default=None) -> str:
    """SHA-256 of ``plan.json``'s content without its ``files`` block, in a canonical encoding.

    Recorded as ``files.plan_sha256`` so corruption of the JSON itself (a flipped digit in an
    error or a config field) is caught, not loaded as a different plan; the ``files`` block is
    left out because its own hashes are checked against the files they name.
    """
    body = {k: v for k, v in data.items() if k != "files"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=default)
    return hashlib.sha256(text.encode()).hexdigest()


def check_params_header(path: pathlib.Path, keys: list[str]) -> None:
    """Check the safetensors header before loading: size, dtypes, shapes, offsets, exact key set."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER_BYTES or n + 8 > size:
            raise ValueError(
                f"Expected a readable safetensors file at {path}, but its header length {n} is invalid. Re-save the plan."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"Expected a readable safetensors file at {path}, but its header is not JSON. Re-save the plan."
        ) from e
    if not isinstance(header, dict):
        raise fail(path, "the safetensors header", "an object", type(header).__name__)
    header.pop("__metadata__", None)
    names = sorted(header)
    if names != sorted(keys):
        extra, absent = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
        raise ValueError(
            _one_line(f"Expected tensors {_short(sorted(keys))} in {path}, but {_short(absent)} are missing and "
                      f"{_short(extra)} are not named by any entry. Re-save the plan.")
        )  # fmt: skip
    data_len = size - 8 - n
    for k, t in header.items():
        if not isinstance(t, dict) or t.get("dtype") not in DTYPE_SIZES:
            raise fail(path, f"tensor {k!r} dtype", f"one of {sorted(DTYPE_SIZES)}", t)
        shape, off = t.get("shape"), t.get("data_offsets")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_TENSOR_DIMS
            and all(is_int(s) and s >= 0 for s in shape)
        ):
            raise fail(path, f"tensor {k!r} shape", f"at most {MAX_TENSOR_DIMS} non-negative sizes", shape)
        if not (
            isinstance(off, list) and len(off) == 2 and all(is_int(o) and 0 <= o <= data_len for o in off)
        ):
            raise fail(path, f"tensor {k!r} data_offsets", "two offsets inside the file", off)
        if off[1] - off[0] != math.prod(shape) * DTYPE_SIZES[t["dtype"]]:
            raise fail(path, f"tensor {k!r} data_offsets", "a span matching its shape and dtype", off)


def _non_finite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _drop_non_finite(obj: Any) -> Any:
    """``obj`` without the NaN/Infinity values of its free-form maps and lists, at any depth."""
    if isinstance(obj, dict):
        return {k: _drop_non_finite(v) for k, v in obj.items() if not _non_finite(v)}
    if isinstance(obj, list):
        return [_drop_non_finite(v) for v in obj if not _non_finite(v)]
    return obj


def finite_for_saving(data: dict[str, Any]) -> dict[str, Any]:
    """``plan.json`` content that :func:`load_plan`'s rules accept: no NaN or Infinity anywhere.

    JSON has no finite spelling of them and loading refuses them (a stranger's file must not
    smuggle a NaN into a budget), so saving must never write them either. Free-form numbers (totals,
    timings, Pareto points, site structures) that are not finite are left out, being no measurement;
    an entry's optional measurement becomes null. An entry's ``error`` is what the plan was judged
    by, so a non-finite one is refused, naming the site, rather than silently written as another number.
    """
    out = {k: (v if k in ("entries", "budget") else _drop_non_finite(v)) for k, v in data.items()}
    entries = []
    for e in data.get("entries", []):
        e = dict(e)
        for k, v in list(e.items()):
            if not _non_finite(v):
                continue
            if k not in _OPTIONAL_ENTRY_NUMBERS:
                raise ValueError(
                    f"Expected a finite {k} for site {e.get('site', '?')!r} to save the plan, but got {v}. "
                    "Re-plan; a candidate whose error cannot be measured must not be chosen."
                )
            e[k] = None
        entries.append(_drop_non_finite(e))
    out["entries"] = entries
    return out
