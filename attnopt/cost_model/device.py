"""Device profiles: the few numbers that turn a candidate's FLOPs and bytes into seconds.

A profile holds peak matmul rates per dtype/format, memory bandwidth, a per-family efficiency
(the share of the site dtype's matmul rate that family's kernel reaches on its own FLOP count)
plus a per-family fixed cost, and a launch overhead. Two kinds exist:

* *seed* profiles (``"h100"``, ``"a100"``) written from ANCHORS.md and public datasheets, for
  planning towards a device one does not have; their ``source`` field says where every number
  came from;
* *measured* profiles from :func:`attnopt.cost_model.profiling.profile_device`, cached as JSON
  keyed by device name, torch/triton/attnopt versions and a hash of the kernel sources (a new torch or a changed kernel changes kernel speeds).

:func:`get_profile` is the one entry the planner uses. The profile record and its cache live in
:mod:`~attnopt.cost_model.device_profile` (re-exported here), so measuring a profile
(:mod:`~attnopt.cost_model.profiling`) never imports this module back.
"""

from __future__ import annotations

import copy
import os

import torch

from attnopt.cost_model.device_profile import (  # re-exported: the record and its cache
    DeviceProfile,
    cache_dir,
    kernels_digest,
    load_cached_profile,
    local_device_name,
    save_profile,
    versions,
)
from attnopt.cost_model.profiling import profile_device

__all__ = [
    "DeviceProfile",
    "SEED_PROFILES",
    "cache_dir",
    "get_profile",
    "kernels_digest",
    "local_device_name",
    "load_cached_profile",
    "save_profile",
    "versions",
]

_H100_SOURCE = (
    "seed: bf16/fp16 matmul 687 TFLOP/s and copy 3.0 TB/s measured in ANCHORS.md (one H100 80GB, torch 2.11); "
    "fp32 67 TFLOP/s, int8/fp8 1979 TOP/s from the NVIDIA H100 SXM datasheet scaled by the measured/datasheet "
    "bf16 ratio 687/989; efficiencies from ANCHORS.md: exact = SDPA cuDNN 610 TF, block_sparse = FlexAttention "
    "block-mask 370-425 TF useful, quantized = SageAttention 1.0.6 ~440 TF dense-eq, linear = fla chunked "
    "linear attention ~107 TF on its own FLOP count; shared and the 5 us launch overhead are estimates"
)
_A100_SOURCE = (
    "seed: NVIDIA A100 SXM 80GB datasheet (bf16/fp16 312, tf32-off fp32 19.5, int8 624 TFLOP/s; 2039 GB/s "
    "HBM2e); exact efficiency 0.70 from the FlashAttention-2 paper (~73% of peak forward); the other "
    "families scaled from the H100 anchors; launch overhead an estimate"
)

#: Profiles of devices one may plan for without having them.
SEED_PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile(
        name="NVIDIA H100 80GB HBM3",
        device_type="cuda",
        matmul_tflops={
            "bfloat16": 687.0,
            "float16": 687.0,
            "float32": 67.0,
            "int8": 1375.0,
            "float8_e4m3fn": 1375.0,
        },
        memory_gbps=3000.0,
        efficiency={"exact": 0.89, "block_sparse": 0.58, "quantized": 0.64, "linear": 0.16, "shared": 0.6},
        causal_tile={"exact": 128},
        launch_overhead_us=5.0,
        source=_H100_SOURCE,
        target="h100",
    ),
    "a100": DeviceProfile(
        name="NVIDIA A100-SXM4-80GB",
        device_type="cuda",
        matmul_tflops={"bfloat16": 312.0, "float16": 312.0, "float32": 19.5, "int8": 624.0},
        memory_gbps=2039.0,
        efficiency={"exact": 0.70, "block_sparse": 0.46, "quantized": 0.55, "linear": 0.13, "shared": 0.47},
        causal_tile={"exact": 128},
        launch_overhead_us=5.0,
        source=_A100_SOURCE,
        target="a100",
    ),
}


def _target_matches_local(target: str) -> bool:
    if target in ("local", "cpu"):
        return True
    if target == "cuda":
        return torch.cuda.is_available()
    return torch.cuda.is_available() and target.lower() in torch.cuda.get_device_name().lower()


def get_profile(
    target: str | DeviceProfile | None = None, *, cache: str | os.PathLike | None = None
) -> DeviceProfile:
    """The profile to plan with.

    Args:
        target: ``None``/``"local"`` (the device this process runs on: cached measurement or a
            fresh one), ``"cpu"``/``"cuda"`` (that local device), a seed name in
            :data:`SEED_PROFILES` (a measured profile when this machine is that device, else the
            seed), or a :class:`DeviceProfile` (returned as is).
        cache: cache directory override (see :func:`cache_dir`).

    Raises:
        ValueError: for an unknown target name.
    """
    if isinstance(target, DeviceProfile):
        return target
    if target is None or target in ("local", "cpu", "cuda"):
        device = None if target in (None, "local") else target
        return profile_device(device, cache_dir=cache)
    if not isinstance(target, str):
        raise TypeError(
            f"Expected a target name or DeviceProfile, but got {type(target).__name__}: {target!r}."
        )
    key = target.lower()
    if key not in SEED_PROFILES:
        raise ValueError(
            f"Expected a target in {['local', 'cpu', 'cuda', *SEED_PROFILES]} or a DeviceProfile, but got "
            f"target={target!r}. Measure an unlisted device with profile_device() on it."
        )
    if _target_matches_local(key):
        return profile_device("cuda", cache_dir=cache)
    return copy.deepcopy(SEED_PROFILES[key])
