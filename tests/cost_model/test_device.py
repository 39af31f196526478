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
from attnopt.cost_model.profiling import (
    Timing,
    fit_family,
    fit_latency_terms,
    profile_device,
)


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
    overhead, eff, score_s, _ = fit_latency_terms(flops, [0.0] * len(flops), seconds, rate)
    assert math.isclose(overhead, 2e-4, rel_tol=1e-6) and math.isclose(eff, 0.4, rel_tol=1e-6)
    assert score_s == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        fit_latency_terms([], [], [], rate)


def test_fit_family_finds_the_causal_tile():
    rate, eff, tile = 1e11, 0.5, 256
    points = []
    for n in (128, 256, 512, 1024, 2048):
        flops = 4 * n * n * 133 / 2
        seconds = 1e-4 + flops * causal_work_factor(n, n, tile) / (rate * eff)
        points.append(Timing(flops, seconds, n, n, True))
    overhead, got_eff, got_tile, rms, score_s = fit_family(points, rate)
    assert got_tile == tile and rms < 1e-6 and math.isclose(got_eff, eff, rel_tol=1e-6)
    assert score_s == 0.0  # no score counts given: no score term


def test_fit_separates_softmax_time_from_flop_time_across_head_dims():
    """Timings made with a known time per score at D=32/64/128: the fit recovers it, and a
    FLOP-only fit would not (it over-charges D=128, where softmax is a smaller share)."""
    rate, eff, per_score, overhead = 1e11, 0.5, 2e-9, 1e-4
    points = []
    for n, d in ((256, 64), (1024, 64), (512, 128), (512, 32), (1024, 128)):
        scores = 4 * n * n
        flops = scores * (4 * d + 5)
        points.append(Timing(flops, overhead + flops / (rate * eff) + scores * per_score, n, n, False, scores))
    got_overhead, got_eff, got_tile, rms, score_s = fit_family(points, rate)
    assert got_tile == 0 and rms < 1e-6
    assert math.isclose(got_eff, eff, rel_tol=1e-4) and math.isclose(score_s, per_score, rel_tol=1e-4)
    assert math.isclose(got_overhead, overhead, rel_tol=1e-3)
    _, flop_only_eff, _, flop_only_rms, _ = fit_family([p._replace(scores=0.0) for p in points], rate)
    assert flop_only_rms > 0.05  # the FLOP rate alone cannot serve three head dims


def test_fit_latency_terms_drops_terms_that_would_be_negative():
    rate = 1e11
    flops = [1e7, 4e7, 1.6e8, 6.4e8]
    seconds = [f / (rate * 0.4) for f in flops]  # pure FLOP time: no overhead, no score term
    overhead, eff, score_s, rms = fit_latency_terms(flops, [f / 100 for f in flops], seconds, rate)
    assert math.isclose(eff, 0.4, rel_tol=1e-6) and overhead >= 0 and score_s >= 0 and rms < 1e-6
    with pytest.raises(ValueError, match="non-empty"):
        fit_latency_terms([], [], [], rate)


def test_profile_keys_fall_back_to_the_family_then_to_exact():
    prof = DeviceProfile(
        name="x",
        device_type="cpu",
        matmul_tflops={"float32": 1.0},
        memory_gbps=10.0,
        efficiency={"exact": 0.5, "block_sparse:static": 0.2, "quantized": 0.3},
        overhead_us={"block_sparse:static": 40.0},
        score_ns={"exact": 1.5},
        launch_overhead_us=5.0,
    )
    assert prof.family_efficiency("block_sparse:static") == 0.2
    assert prof.family_efficiency("block_sparse:dynamic") == 0.5  # neither the kernel nor the family: exact's
    assert prof.family_efficiency("quantized:int8") == 0.3  # the family's own entry
    assert prof.family_efficiency("head_pruned") == 0.5 and math.isclose(prof.family_score_s("head_pruned"), 1.5e-9)
    assert math.isclose(prof.family_overhead_s("block_sparse:static"), 45e-6)
    assert prof.family_score_s("linear") == 0.0


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


def test_profiles_measure_the_families_with_an_operator_only():
    """Head pruning's registered kernel emulates a weight rewrite; profiling times operators, so it
    must not try to time that family (it would fail and log a warning on every fresh profile)."""
    import torch

    from attnopt.codegen.ops import KERNELS, op_for
    from attnopt.cost_model.profiling import _kernel_families

    assert ("head_pruned", "any") in KERNELS
    fams = _kernel_families(torch.device("cpu"))
    assert "head_pruned" not in fams and fams[0] == "exact"
    assert {"block_sparse", "quantized", "linear", "shared"} <= set(fams)
    for fam in fams:
        op_for(fam)
