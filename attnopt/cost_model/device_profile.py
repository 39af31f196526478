"""A device profile as data: the few numbers that turn a candidate's FLOPs and bytes into seconds.

:class:`DeviceProfile` holds peak matmul rates per dtype/format, memory bandwidth, a per-family
efficiency (the share of the site dtype's matmul rate that family's kernel reaches on its own
FLOP count) plus a per-family fixed cost, and a launch overhead. Measured profiles are cached
as JSON keyed by device name, torch/triton/attnopt versions and a hash of the kernel sources
(a new torch or a changed kernel changes kernel speeds). This module is the record and its
cache only: :mod:`~attnopt.cost_model.profiling` measures profiles, and
:mod:`~attnopt.cost_model.device` holds the seed profiles and :func:`get_profile`, which
chooses among them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = [
    "DeviceProfile",
    "cache_dir",
    "kernels_digest",
    "local_device_name",
    "load_cached_profile",
    "save_profile",
    "versions",
]



@dataclass
class DeviceProfile:
    """Roofline numbers of one device.

    Attributes:
        name: device name, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu-AMD EPYC-2t"``.
        device_type: ``"cuda"`` or ``"cpu"``.
        matmul_tflops: peak dense matmul rate per dtype/format name (``"float32"``,
            ``"float16"``, ``"bfloat16"``, ``"int8"``, ``"float8_e4m3fn"``), TFLOP/s (TOP/s).
        memory_gbps: sustained memory bandwidth (read + write), GB/s.
        efficiency: per kernel, the share of ``matmul_tflops[site dtype]`` it reaches on the
            FLOPs its cost formula states (``"exact"`` = the dense SDPA backend). Keys are
            ``Family.profile_key`` values: a family name, or ``"<family>:<kernel>"`` where a
            family runs several kernels; a missing ``"<family>:<kernel>"`` falls back to the
            family's own entry, a missing family to exact's.
        overhead_us: per kernel, a fixed cost per call on top of ``launch_overhead_us``
            (Python-level work of CPU kernels, block-layout set-up, ...).
        causal_tile: per kernel, the tile size by which it skips masked causal work
            (0 or absent: its cost formula already counts the right work); see
            :func:`attnopt.cost_model.latency.causal_work_factor`.
        score_ns: per kernel, nanoseconds per attention score on top of the FLOP time: the
            softmax, masking and scaling work that does not grow with the head dim (absent:
            none fitted, the FLOP rate covers it).
        launch_overhead_us: fixed cost of one operator call.
        source: where the numbers come from (``"measured ..."`` or datasheet references).
        versions: torch/triton/attnopt versions the profile was measured with.
        target: the short name the profile was requested as (``"h100"``, ``"local"``, ...).
    """

    #: 2: per-kernel keys and ``score_ns``. Part of the cache file name, so profiles measured
    #: with an older fit are measured again rather than reused.
    VERSION: ClassVar[int] = 2

    name: str
    device_type: str
    matmul_tflops: dict[str, float]
    memory_gbps: float
    efficiency: dict[str, float] = field(default_factory=dict)
    overhead_us: dict[str, float] = field(default_factory=dict)
    causal_tile: dict[str, int] = field(default_factory=dict)
    score_ns: dict[str, float] = field(default_factory=dict)
    launch_overhead_us: float = 5.0
    source: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    target: str = ""

    def __post_init__(self) -> None:
        if not self.matmul_tflops or any(not v > 0 for v in self.matmul_tflops.values()):
            raise ValueError(f"Expected positive matmul rates, but got matmul_tflops={self.matmul_tflops}.")
        if not self.memory_gbps > 0:
            raise ValueError(f"Expected a positive memory bandwidth, but got memory_gbps={self.memory_gbps}.")
        bad = {k: v for k, v in self.efficiency.items() if not 0 < v <= 4}
        if bad:
            raise ValueError(f"Expected efficiencies in (0, 4], but got {bad}. Re-measure the profile.")

    def rate(self, dtype: str) -> float:
        """Matmul FLOP/s for ``dtype``; an unknown dtype falls back to the slowest known rate."""
        tflops = self.matmul_tflops.get(dtype)
        if tflops is None:
            tflops = min(self.matmul_tflops.values())
        return tflops * 1.0e12

    @staticmethod
    def _lookup(table: dict[str, Any], key: str) -> Any:
        """``table[key]``, else the entry of the key's family, else None (see ``efficiency``)."""
        family = key.split(":", 1)[0]
        if family == "head_pruned":  # runs the exact operator with fewer heads
            key = family = "exact"
        return table[key] if key in table else table.get(family)

    def family_efficiency(self, key: str) -> float:
        """Efficiency of a kernel (a profile key or family name); one never measured is taken as fast as exact."""
        value = self._lookup(self.efficiency, key)
        return value if value is not None else self.efficiency.get("exact", 0.5)

    def family_overhead_s(self, key: str) -> float:
        """Fixed seconds per call of a kernel: launch overhead plus the kernel's own."""
        return (self.launch_overhead_us + (self._lookup(self.overhead_us, key) or 0.0)) * 1.0e-6

    def family_score_s(self, key: str) -> float:
        """Seconds per attention score a kernel spends beyond its FLOP time (0 when none was fitted)."""
        return (self._lookup(self.score_ns, key) or 0.0) * 1.0e-9

    def family_causal_tile(self, key: str) -> int:
        """Tile by which a kernel skips masked causal work (0: its formula counts the right work)."""
        return int(self._lookup(self.causal_tile, key) or 0)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict with a schema version."""
        return {"version": self.VERSION, "fields": dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceProfile:
        """Inverse of :meth:`to_json`; a newer version raises ``ValueError``."""
        if not isinstance(d, dict) or "fields" not in d:
            raise ValueError(f"Expected a profile dict with 'version' and 'fields', but got keys {list(d)}.")
        if int(d.get("version", -1)) > cls.VERSION:
            raise ValueError(
                f"The device profile has version {d.get('version')}, newer than this attnopt understands "
                f"({cls.VERSION}); upgrade attnopt or delete the cached profile."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d["fields"].items() if k in names})


def versions() -> dict[str, str]:
    """torch/triton/attnopt versions, the part of a profile's cache key that is not the device."""
    from attnopt._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "attnopt": __version__}


def local_device_name(device: torch.device | str | None = None) -> str:
    """A stable name for ``device`` (default: the first GPU if any, else the CPU)."""
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = "cpu"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{model}-{torch.get_num_threads()}t"


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Where profiles are cached: ``path``, else ``$ATTNOPT_CACHE``, else ``~/.cache/attnopt``."""
    if path is not None:
        return pathlib.Path(path)
    env = os.environ.get("ATTNOPT_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "attnopt"


@functools.lru_cache(maxsize=1)
def kernels_digest() -> str:
    """A short hash of attnopt's kernel sources (``attnopt/codegen``).

    Part of a measured profile's cache key: a profile holds each family's measured efficiency,
    which a changed kernel invalidates even when no version number moved.
    """
    root = pathlib.Path(__file__).resolve().parent.parent / "codegen"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _cache_file(name: str, directory: pathlib.Path) -> pathlib.Path:
    v = versions()
    stem = re.sub(
        r"[^A-Za-z0-9._-]+",
        "_",
        f"profile-{name}-torch{v['torch']}-triton{v['triton']}-attnopt{v['attnopt']}-k{kernels_digest()}"
        f"-p{DeviceProfile.VERSION}",
    )
    return directory / f"{stem}.json"


def load_cached_profile(name: str, directory: str | os.PathLike | None = None) -> DeviceProfile | None:
    """The cached measured profile of device ``name`` for the running versions, or None.

    A cache file that cannot be read is ignored (and will be overwritten by a new measurement).
    """
    path = _cache_file(name, cache_dir(directory))
    if not path.is_file():
        return None
    try:
        return DeviceProfile.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None


def save_profile(profile: DeviceProfile, directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Write ``profile`` to the cache (atomically, so a crash never leaves half a file)."""
    d = cache_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = _cache_file(profile.name, d)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2, sort_keys=True))
    tmp.replace(path)
    return path
