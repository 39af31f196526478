"""Mutations of a saved plan directory and the oracle they are judged by (shared by the fuzz
test and ``benchmarks/plan_fuzz.py``).

Accidental damage (truncation, flipped bytes, edits left unsigned) must be refused or be
harmless (the loaded plan equals the original). Crafted plans, whose hashes the mutation
re-signs the way a stranger could, must be refused or load *faithfully*: every value the file
states is the value the loaded plan holds, so nothing is dropped or changed silently.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import shutil

import torch

from attnopt.cost_model import Budget, load_plan, make_site
from attnopt.cost_model.plan import Plan, PlanEntry, fingerprint
from attnopt.cost_model.plan_checks import content_sha256, file_sha256
from attnopt.replacements.exact import ExactConfig
from attnopt.replacements.quantized import QuantizedConfig

KINDS = (
    "truncate_json", "truncate_params", "flip_json", "flip_params", "whitespace", "wrong_type",
    "wrong_type_signed", "unknown_family", "bad_number", "bad_number_signed", "path_traversal",
    "missing_key", "missing_key_signed", "extra_key", "extra_key_signed", "flip_params_signed",
    "older_schema",
)  # fmt: skip

_POOL = [None, True, False, "x", "", 0, 1, -1, 1.5, [], {}, [1], {"a": 1}, ["s"]]
_NUMBERS = [-1, -1e300, 1e300, math.inf, -math.inf, math.nan, 10**30, -(10**30), 2**63]
_NAMES = ["../params.safetensors", "/etc/passwd", "sub/params.safetensors", "..", "", ".", "a\x00b",
          "..\\params.safetensors", "missing.safetensors", "LINK"]  # fmt: skip


def build_plan() -> Plan:
    """A small plan with one entry carrying tensors (float32 and int8) and two exact entries."""
    sites = [make_site(f"model.layers.{i}.self_attn#0", heads=4, seq=256, head_dim=32) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    entries = [
        PlanEntry(
            site=sites[0].name,
            family="quantized",
            config=QuantizedConfig(q_block=128).to_json(),
            params=[torch.randn(4, 32, 8, generator=g), torch.randint(-128, 127, (16,), dtype=torch.int8, generator=g)],
            predicted_s=1e-3, measured_s=1.2e-3, exact_predicted_s=2e-3, error=0.011, cosine=0.9999,
            notes="int8 qk", min_len=64, end_to_end=0.004,
        )  # fmt: skip
    ] + [PlanEntry(site=s.name, family="exact", config=ExactConfig().to_json(), predicted_s=2e-3) for s in sites[1:]]
    return Plan(
        entries=entries,
        budget=Budget(speedup=1.5, max_error=0.02),
        device="test-device",
        target="h100",
        fingerprint=fingerprint(sites),
        sites=[s.structure() for s in sites],
        pareto=[{"seconds": 6e-3, "error": 0.0, "speedup": 1.0}, {"seconds": 5e-3, "error": 0.011, "speedup": 1.2}],
        totals={"exact_s": 6e-3, "planned_s": 5e-3, "speedup": 1.2, "error": 0.011},
        timings={"solve": 0.01},
        versions={"attnopt": "0.1.0"},
        modules={sites[0].name: {"class": "Attn", "q_proj": [128, 128]}},
        steps=["validated"],
    )


def same_plan(a: Plan, b: Plan) -> bool:
    if a.to_json() != b.to_json() or len(a.entries) != len(b.entries):
        return False
    for x, y in zip(a.entries, b.entries):
        if len(x.params) != len(y.params):
            return False
        for p, q in zip(x.params, y.params):
            if p.dtype != q.dtype or p.shape != q.shape or not torch.equal(p, q):
                return False
    return True


def _stated(file_value, loaded_value) -> bool:
    """Every value the file states is what the plan holds (defaults may fill absent keys)."""
    if isinstance(file_value, dict):
        return isinstance(loaded_value, dict) and all(
            k in loaded_value and _stated(v, loaded_value[k]) for k, v in file_value.items()
        )
    if isinstance(file_value, list):
        return (
            isinstance(loaded_value, list)
            and len(file_value) == len(loaded_value)
            and all(_stated(v, w) for v, w in zip(file_value, loaded_value))
        )
    return type(file_value) is type(loaded_value) and file_value == loaded_value


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _write(d: pathlib.Path, data, signed: bool) -> None:
    if signed:
        name = data.get("files", {}).get("params") if isinstance(data.get("files"), dict) else None
        target = d / name if isinstance(name, str) and name and "\x00" not in name else None
        if isinstance(data.get("files"), dict):
            data["files"]["plan_sha256"] = content_sha256(data)
            if target is not None and target.is_file() and name == "params.safetensors":
                data["files"]["params_sha256"] = file_sha256(target)
    (d / "plan.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def mutate(kind: str, rng: random.Random, d: pathlib.Path) -> bool:
    """Apply one mutation of ``kind`` to plan directory ``d``; return whether it was re-signed."""
    pj, pt = d / "plan.json", d / "params.safetensors"
    if kind in ("truncate_json", "truncate_params"):
        f = pj if kind == "truncate_json" else pt
        raw = f.read_bytes()
        f.write_bytes(raw[: rng.randrange(len(raw))])
        return False
    if kind in ("flip_json", "flip_params", "flip_params_signed"):
        f = pj if kind == "flip_json" else pt
        raw = bytearray(f.read_bytes())
        for _ in range(rng.choice([1, 1, 2, 8])):
            raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        f.write_bytes(bytes(raw))
        if kind == "flip_params_signed":
            _write(d, json.loads(pj.read_text()), signed=True)
            return True
        return False
    data = json.loads(pj.read_text())
    signed = kind.endswith("_signed") or kind in ("unknown_family", "path_traversal", "older_schema")
    if kind == "whitespace":
        pj.write_text(json.dumps(data, indent=rng.choice([None, 0, 1, 4, "\t"]), sort_keys=rng.random() < 0.5))
        return False
    paths = [p for p in _paths(data) if p]
    if kind.startswith("wrong_type"):
        path = rng.choice(paths)
        old = _get(data, path)
        _get(data, path[:-1])[path[-1]] = rng.choice([v for v in _POOL if type(v) is not type(old)])
    elif kind.startswith("bad_number"):
        nums = [p for p in paths if isinstance(_get(data, p), (int, float)) and not isinstance(_get(data, p), bool)]
        path = rng.choice(nums)
        _get(data, path[:-1])[path[-1]] = rng.choice(_NUMBERS)
    elif kind == "unknown_family":
        e = rng.choice(data["entries"])
        e["family"] = rng.choice(["nope", "Exact", "", "quantized ", "os.system"])
        if rng.random() < 0.5:
            e["config"]["family"] = e["family"]
    elif kind == "path_traversal":
        name = rng.choice(_NAMES)
        if name == "LINK":
            outside = d.parent / f"{d.name}-outside.safetensors"
            shutil.copyfile(pt, outside)
            os.symlink(outside, d / "link.safetensors")
            name = "link.safetensors"
        elif name in ("../params.safetensors", "sub/params.safetensors"):
            (d / "sub").mkdir(exist_ok=True)
            shutil.copyfile(pt, d / "sub" / "params.safetensors")
            shutil.copyfile(pt, d.parent / "params.safetensors")
        data["files"]["params"] = name
    elif kind.startswith("missing_key"):
        dicts = [p for p in paths if isinstance(_get(data, p[:-1]), dict)]
        path = rng.choice(dicts)
        del _get(data, path[:-1])[path[-1]]
    elif kind.startswith("extra_key"):
        holders = [p for p in [(), *paths] if isinstance(_get(data, p), dict)]
        _get(data, rng.choice(holders))[rng.choice(["extra", "__class__", "params", "x" * 3])] = rng.choice(_POOL)
    elif kind == "older_schema":
        data["schema_version"] = rng.choice([0, -1, -(2**40)])
    else:
        raise ValueError(f"unknown mutation kind {kind!r}")
    _write(d, data, signed)
    return signed


def judge(d: pathlib.Path, original: Plan, signed: bool) -> str:
    """``"refused"``, ``"harmless"`` or ``"faithful"``; raises ``AssertionError`` otherwise."""
    try:
        loaded = load_plan(d)
    except (ValueError, FileNotFoundError) as e:
        assert "\n" not in str(e) and str(e), f"message not one line: {str(e)!r}"
        return "refused"
    if same_plan(loaded, original):
        return "harmless"
    assert signed, "an unsigned mutation loaded as a different plan"
    data = json.loads((d / "plan.json").read_text())
    data.pop("files")
    assert _stated(data, loaded.to_json()), "a crafted plan loaded with values other than its file states"
    return "faithful"


def run_one(kind: str, seed: int, template: pathlib.Path, work: pathlib.Path, original: Plan) -> str:
    d = work / "plan"
    shutil.copytree(template, d, symlinks=True)
    try:
        signed = mutate(kind, random.Random(seed), d)
        return judge(d, original, signed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
