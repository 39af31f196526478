"""Error measurement: pooled relative L2 and cosine against attention_reference, on real kernels."""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.cost_model.error import candidate_output, clear_error_cache, measure_candidate_error
from attnopt.cost_model.synthetic import make_site, make_stats
from attnopt.replacements.base import FAMILIES, Candidate
from attnopt.replacements.exact import ExactFamily, attention_reference


def test_exact_kernel_output_matches_reference():
    site = make_site(heads=4, kv_heads=2, seq=96, head_dim=32, causal=True)
    stats = make_stats(site, num_samples=1, seed=3)
    cand = ExactFamily().candidates(site, stats)[0]
    q, k, v = stats.q[0], stats.k[0], stats.v[0]
    out = candidate_output(site, cand, q, k, v)
    ref = attention_reference(q.double(), k.double(), v.double(), scale=site.scale, causal=True).float()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert measure_candidate_error(site, cand, stats) == (0.0, 1.0)


def test_validation():
    site = make_site(heads=2, seq=32, head_dim=16)
    cand = ExactFamily().candidates(site, None)[0]
    with pytest.raises(ValueError, match="calibration samples"):
        measure_candidate_error(site, cand, make_stats(site, num_samples=1).__class__(site=site.name))
    other = make_stats(make_site("other#0", heads=2, seq=32, head_dim=16), num_samples=1)
    with pytest.raises(ValueError, match="stats of site"):
        measure_candidate_error(site, cand, other)


@pytest.mark.skipif("head_pruned" not in FAMILIES, reason="head_pruned family not present")
@pytest.mark.parametrize("window", [None, 24])
def test_head_pruned_error_is_the_pruned_heads_share(window):
    from attnopt.replacements.head_pruned import HeadPrunedConfig

    clear_error_cache()
    site = make_site("model.layers.0.attn#0", heads=4, seq=64, head_dim=16, causal=True, window=window)
    stats = make_stats(site, num_samples=2, seed=int(torch.randint(0, 10_000, ())))
    cand = Candidate(
        site=site.name, family="head_pruned", config=HeadPrunedConfig(keep=(0, 1, 3), kv_keep=(0, 1, 3))
    )
    rel, cos = measure_candidate_error(site, cand, stats)
    pruned = total = 0.0
    for q, k, v, _ in stats.samples():
        ref = attention_reference(
            q.double(), k.double(), v.double(), scale=site.scale, causal=True, window=window
        )
        pruned += float(ref[:, 2].pow(2).sum())
        total += float(ref.pow(2).sum())
    assert rel == pytest.approx(math.sqrt(pruned / total), rel=1e-6)
    assert cos == pytest.approx(math.sqrt(1 - pruned / total), rel=1e-6)


@pytest.mark.skipif("quantized" not in FAMILIES, reason="quantized family not present")
def test_quantized_candidates_have_small_nonzero_error():
    from attnopt.cost_model.profiling import load_kernels

    load_kernels("cpu")
    site = make_site("model.layers.1.attn#0", heads=2, seq=128, head_dim=32, causal=True)
    stats = make_stats(site, num_samples=1, seed=int(torch.randint(0, 10_000, ())))
    cands = FAMILIES["quantized"].candidates(site, stats)
    assert cands
    for cand in cands:
        rel, cos = measure_candidate_error(site, cand, stats, cache=False)
        assert 0.0 < rel < 0.1, cand.label
        assert 0.99 < cos <= 1.0
        q, k, v = stats.q[0], stats.k[0], stats.v[0]
        out = candidate_output(site, cand, q, k, v).double()
        ref = attention_reference(q.double(), k.double(), v.double(), scale=site.scale, causal=True)
        assert rel == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-6)


def test_synthetic_stats_follow_the_documented_shapes():
    site = make_site("model.layers.2.attn#0", heads=4, kv_heads=2, seq=64, head_dim=16, causal=True)
    stats = make_stats(site, num_samples=2, seed=int(torch.randint(0, 10_000, ())))
    assert len(stats.q) == 2 and stats.q[0].shape == (1, 4, 64, 16) and stats.k[0].shape == (1, 2, 64, 16)
    assert stats.sink_mass.shape == (4,) and stats.entropy.shape == (4,)
    assert stats.distance_mass.shape == (4, 16) and stats.head_similarity.shape == (4, 4)
    assert torch.allclose(stats.distance_mass.sum(-1), torch.ones(4), atol=1e-4)  # every row's mass binned
    assert torch.allclose(stats.head_similarity.diagonal(), torch.ones(4), atol=1e-4)
    assert bool((stats.sink_mass > 0).all()) and bool((stats.sink_mass < 1).all())
