"""Device profiles: seeds, JSON and cache round trips, fitting, and a short real measurement."""

from __future__ import annotations

import copy
import json
import math

import pytest

from attnopt.cost_model.device import (
    SEED_PROFILES,
    DeviceProfile,
    cache_dir,
    get_profile,
    load_cached_profile,
)
from attnopt.cost_model.latency import causal_work_factor
from attnopt.cost_model.profiling import Timing, fit_family, fit_overhead_and_efficiency, profile_device


def test_seed_profiles_are_valid_and_sourced():
    for name, prof in SEED_PROFILES.items():
        assert prof.target == name and prof.device_type == "cuda"
        assert "datasheet" in prof.source
        assert {"bfloat16", "float16", "float32", "int8"} <= set(prof.matmul_tflops)
        assert 0 < prof.family_efficiency("exact") <= 1
        assert prof.family_efficiency("head_pruned") == prof.family_efficiency("exact")
        assert DeviceProfile.from_json(json.loads(json.dumps(prof.to_json()))) == prof
    assert "float8_e4m3fn" in SEED_PROFILES["h100"].matmul_tflops


def test_get_profile_targets(tmp_path):
    h100 = get_profile("H100", cache=tmp_path)
    assert h100 == SEED_PROFILES["h100"] and h100 is not SEED_PROFILES["h100"]
    h100.efficiency["exact"] = 0.1  # a copy: the seed is untouched
    assert SEED_PROFILES["h100"].efficiency["exact"] == 0.89
    assert get_profile(h100) is h100
    with pytest.raises(ValueError, match="Expected a target in"):
        get_profile("tpu-v5", cache=tmp_path)
    with pytest.raises(TypeError):
        get_profile(3)


def test_profile_validation_and_versions():
    fields = copy.deepcopy(SEED_PROFILES["a100"].to_json())
    fields["version"] = DeviceProfile.VERSION + 1
    with pytest.raises(ValueError, match="newer"):
        DeviceProfile.from_json(fields)
    with pytest.raises(ValueError, match="matmul"):
        DeviceProfile(name="x", device_type="cpu", matmul_tflops={"float32": 0.0}, memory_gbps=1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        DeviceProfile(name="x", device_type="cpu", matmul_tflops={"float32": 1.0}, memory_gbps=-1.0)
    with pytest.raises(ValueError, match="efficiencies"):
        DeviceProfile(
            name="x",
            device_type="cpu",
            matmul_tflops={"float32": 1.0},
            memory_gbps=1.0,
            efficiency={"exact": 0},
        )


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNOPT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir(tmp_path) == tmp_path


def test_fit_recovers_known_overhead_and_efficiency():
    rate = 1e11
    flops = [1e7, 4e7, 1.6e8, 6.4e8]
    seconds = [2e-4 + f / (rate * 0.4) for f in flops]
    overhead, eff = fit_overhead_and_efficiency(flops, seconds, rate)
    assert math.isclose(overhead, 2e-4, rel_tol=1e-6) and math.isclose(eff, 0.4, rel_tol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        fit_overhead_and_efficiency([], [], rate)


def test_fit_family_finds_the_causal_tile():
    rate, eff, tile = 1e11, 0.5, 256
    points = []
    for n in (128, 256, 512, 1024, 2048):
        flops = 4 * n * n * 133 / 2
        seconds = 1e-4 + flops * causal_work_factor(n, n, tile) / (rate * eff)
        points.append(Timing(flops, seconds, n, n, True))
    overhead, got_eff, got_tile, rms = fit_family(points, rate)
    assert got_tile == tile and rms < 1e-6 and math.isclose(got_eff, eff, rel_tol=1e-6)


def test_profile_device_measures_and_caches(tmp_path):
    prof = profile_device("cpu", cache_dir=tmp_path, families=["exact"])
    assert prof.device_type == "cpu" and prof.target == "local"
    assert prof.matmul_tflops["float32"] > 0 and prof.memory_gbps > 0 and prof.launch_overhead_us > 0
    assert 0 < prof.efficiency["exact"] <= 4
    cached = load_cached_profile(prof.name, tmp_path)
    assert cached == prof
    assert profile_device("cpu", cache_dir=tmp_path, families=["exact"]) == prof  # from the cache
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1 and "torch" in files[0].name
    files[0].write_text("{not json")
    assert load_cached_profile(prof.name, tmp_path) is None  # a broken cache is ignored, re-measured
