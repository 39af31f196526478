"""Latency: the roofline formula, the causal tile factor, and timing the real operator."""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.cost_model.device import DeviceProfile
from attnopt.cost_model.latency import (
    causal_work_factor,
    kept_heads,
    measure_latency,
    predict_latency,
    site_shape,
)
from attnopt.cost_model.synthetic import make_site
from attnopt.replacements.base import Candidate
from attnopt.replacements.exact import ExactConfig, ExactFamily


def _profile(**kw) -> DeviceProfile:
    base = dict(
        name="toy",
        device_type="cpu",
        matmul_tflops={"float32": 1.0},
        memory_gbps=100.0,
        efficiency={"exact": 0.5},
        launch_overhead_us=10.0,
    )
    base.update(kw)
    return DeviceProfile(**base)


def test_causal_work_factor():
    assert causal_work_factor(512, 512, 0) == 1.0
    assert causal_work_factor(512, 512, 512) == 2.0  # one tile: everything computed
    assert causal_work_factor(1024, 1024, 512) == pytest.approx(1.5)  # 3 of 4 tiles
    assert 1.0 < causal_work_factor(8192, 8192, 64) < 1.01
    assert causal_work_factor(1, 4096, 128) == pytest.approx(2.0)  # decode: one row sees every key


def test_roofline_compute_and_memory_bound():
    site = make_site(heads=8, seq=1024, head_dim=64, causal=False)
    cand = ExactFamily().candidates(site, None)[0]
    flops, nbytes = cand.cost.evaluate(**site_shape(site))
    prof = _profile()
    expected = max(flops / (1e12 * 0.5), nbytes / 100e9) + 10e-6
    assert predict_latency(site, cand, prof) == pytest.approx(expected)
    slow_mem = _profile(memory_gbps=1e-3)
    assert predict_latency(site, cand, slow_mem) == pytest.approx(nbytes / 1e6 + 10e-6)
    bigger = predict_latency(site, cand, prof, site_shape(site, Nq=2048, Nk=2048))
    assert bigger > predict_latency(site, cand, prof)
    with pytest.raises(ValueError, match="shape symbols"):
        site_shape(site, N=3)


def test_causal_tile_is_applied_only_where_fitted():
    site = make_site(heads=8, seq=512, head_dim=64, causal=True)
    cand = ExactFamily().candidates(site, None)[0]
    plain = predict_latency(site, cand, _profile(launch_overhead_us=0.0))
    tiled = predict_latency(site, cand, _profile(launch_overhead_us=0.0, causal_tile={"exact": 512}))
    assert tiled == pytest.approx(2 * plain)


def test_unknown_family_falls_back_to_exact_efficiency():
    site = make_site(heads=4, seq=256, head_dim=32, causal=False)
    exact = ExactFamily().candidates(site, None)[0]
    other = Candidate(site=site.name, family="shared", config=ExactConfig(), cost=exact.cost)
    assert predict_latency(site, other, _profile()) == pytest.approx(predict_latency(site, exact, _profile()))


def test_measure_latency_times_the_operator_and_caches():
    site = make_site(heads=2, seq=128, head_dim=32, causal=True)
    cand = ExactFamily().candidates(site, None)[0]
    q, k, v = (torch.randn(1, 2, 128, 32) for _ in range(3))
    t = measure_latency(site, cand, q, k, v, repeats=3)
    assert 0 < t < 1.0
    assert measure_latency(site, cand, q, k, v, repeats=3) == t  # cached
    assert math.isfinite(measure_latency(site, cand, q, k, v, repeats=1, cache=False))


def test_head_pruned_counts_kept_heads():
    from dataclasses import dataclass

    from attnopt.replacements.base import FamilyConfig

    @dataclass(frozen=True)
    class _Pruned(FamilyConfig):
        keep: tuple = (0, 2)
        kv_keep: tuple = (0, 2)

    site = make_site(heads=4, seq=64, head_dim=16)
    cand = Candidate(site=site.name, family="head_pruned", config=_Pruned())
    assert kept_heads(cand, 4) == 2
    q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
    assert measure_latency(site, cand, q, k, v, repeats=2) > 0


def test_paired_ratio_sees_a_slower_function_and_gives_up_early():
    import time

    from attnopt.cost_model._timing import paired_ratio

    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    ratio = paired_ratio(slow, lambda: time.sleep(0.002), warmup=0, repeats=5)
    assert 3.0 < ratio < 30.0  # ~10; sleeps overshoot on a loaded machine, hence the wide band
    calls["slow"] = 0
    paired_ratio(slow, lambda: time.sleep(0.002), warmup=0, repeats=5, give_up_above=1.5)
    assert calls["slow"] == 1  # one pair was enough to know
    with pytest.raises(ValueError, match="repeats"):
        paired_ratio(slow, slow, repeats=0)


def test_measure_relative_of_exact_against_itself_is_about_one():
    from attnopt.cost_model.latency import measure_relative

    site = make_site(heads=2, seq=256, head_dim=32, causal=True)
    cand = ExactFamily().candidates(site, None)[0]
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    # generous: the machine is shared; what matters is that it is a ratio, not seconds
    assert 0.3 < measure_relative(site, cand, cand, q, k, v, repeats=5, cache=False) < 3.0
