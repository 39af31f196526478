"""Shared-score (CHAI) family: reference semantics, clustering, CPU kernel and operator."""

from __future__ import annotations

import json

import pytest
import torch

import attnopt.codegen.cpu.shared as cpu_shared  # registers the CPU kernel
from attnopt.calibration.stats import SiteStats
from attnopt.codegen.cpu.shared import shared_attention, size_groups
from attnopt.codegen.ops import op_for
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import Candidate, get_family
from attnopt.replacements.exact import attention_reference
from attnopt.replacements.shared import (
    SharedConfig,
    attention_similarity,
    cluster_heads,
    selection_reuse_plan,
    shared_params,
)


def _site(heads, kv_heads, *, causal=True, window=None):
    return AttentionSite(
        name="blk.attn#0",
        module_path="blk.attn",
        index=0,
        pattern="sdpa",
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=16,
        head_dim_v=16,
        q_len=32,
        kv_len=32,
        batch=1,
        causal=causal,
        scale=0.25,
        mask="sliding_window" if window else ("causal" if causal else "none"),
        window=window,
    )


def _candidate(clusters, reps, heads):
    config = SharedConfig(clusters=clusters, representatives=reps, threshold=0.9)
    return Candidate("blk.attn#0", "shared", config, shared_params(config, heads))


def _qkv(b, heads, kv_heads, nq, nk, d=16, dv=16, dtype=torch.float32):
    return (
        torch.randn(b, heads, nq, d, dtype=dtype),
        torch.randn(b, kv_heads, nk, d, dtype=dtype),
        torch.randn(b, kv_heads, nk, dv, dtype=dtype),
    )


def _run_kernel(q, k, v, cand, *, scale, causal, window=None, attn_mask=None):
    groups = size_groups(cand.config.clusters, cand.config.representatives)
    return shared_attention(q, k, v, groups, scale=scale, causal=causal, window=window, attn_mask=attn_mask)


@pytest.mark.parametrize(
    "causal, window, nq", [(False, None, 20), (True, None, 20), (True, 6, 20), (True, None, 33)]
)
def test_singleton_clusters_equal_exact(causal, window, nq):
    fam = get_family("shared")
    q, k, v = _qkv(2, 6, 3, nq, 27)
    cand = _candidate(tuple((h,) for h in range(6)), tuple(range(6)), 6)
    exact = attention_reference(q, k, v, scale=0.3, causal=causal, window=window)
    torch.testing.assert_close(fam.reference(q, k, v, cand, scale=0.3, causal=causal, window=window), exact)
    got = _run_kernel(q, k, v, cand, scale=0.3, causal=causal, window=window)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


def test_identical_heads_clustered_give_exact_result():
    fam = get_family("shared")
    q, k, v = _qkv(1, 4, 4, 24, 24)
    q[:, 2], k[:, 2] = q[:, 0], k[:, 0]  # heads 0 and 2 have the same attention map
    q[:, 3], k[:, 3] = q[:, 1], k[:, 1]
    cand = _candidate(((0, 2), (1, 3)), (2, 1), 4)
    exact = attention_reference(q, k, v, scale=0.25, causal=True)
    torch.testing.assert_close(fam.reference(q, k, v, cand, scale=0.25, causal=True), exact)
    torch.testing.assert_close(
        _run_kernel(q, k, v, cand, scale=0.25, causal=True), exact, rtol=1e-5, atol=1e-5
    )
    # ... and sharing between heads that differ does change the result.
    other = _candidate(((0, 1), (2, 3)), (0, 2), 4)
    assert (fam.reference(q, k, v, other, scale=0.25, causal=True) - exact).abs().max() > 1e-2


def test_reference_uses_representative_scores_and_member_values():
    fam = get_family("shared")
    q, k, v = _qkv(1, 4, 2, 10, 10)
    cand = _candidate(((0, 1, 3), (2,)), (3, 2), 4)
    out = fam.reference(q, k, v, cand, scale=0.5, causal=False)
    p_rep = torch.softmax((q[:, 3] @ k[:, 1].transpose(-1, -2)) * 0.5, dim=-1)  # head 3 is in kv group 1
    torch.testing.assert_close(out[:, 0], p_rep @ v[:, 0])
    torch.testing.assert_close(out[:, 3], p_rep @ v[:, 1])
    torch.testing.assert_close(
        out[:, 2], attention_reference(q[:, 2:3], k[:, 1:2], v[:, 1:2], scale=0.5)[:, 0]
    )


@pytest.mark.parametrize(
    "heads, kv_heads, nq, nk, causal, window",
    [
        (8, 8, 33, 33, False, None),
        (8, 2, 40, 40, True, None),
        (6, 3, 7, 29, True, None),  # decode-like chunk: bottom-right causal
        (8, 4, 37, 37, True, 9),
        (4, 1, 300, 300, True, None),  # several query chunks
        (4, 2, 300, 120, True, None),  # more queries than keys: the first rows see nothing
        (6, 2, 90, 400, True, 50),  # window over a longer key sequence
    ],
)
@pytest.mark.parametrize("tile", [None, 1])  # 1: 16-row chunks, so chunk edges and skipped chunks are hit
def test_kernel_matches_reference_random(heads, kv_heads, nq, nk, causal, window, tile, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(cpu_shared, "_TILE_ELEMENTS", tile)
    fam = get_family("shared")
    gen = torch.Generator().manual_seed(heads * 1000 + nq)
    perm = torch.randperm(heads, generator=gen).tolist()
    clusters = tuple(sorted(tuple(sorted(perm[i : i + 3])) for i in range(0, heads, 3)))
    reps = tuple(c[len(c) // 2] for c in clusters)
    cand = _candidate(clusters, reps, heads)
    q, k, v = _qkv(2, heads, kv_heads, nq, nk, dv=12)
    ref = fam.reference(q, k, v, cand, scale=0.3, causal=causal, window=window)
    got = _run_kernel(q, k, v, cand, scale=0.3, causal=causal, window=window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive", "per_head"])
def test_kernel_with_masks(kind):
    fam = get_family("shared")
    q, k, v = _qkv(2, 6, 3, 19, 19)
    if kind == "per_head":
        mask = torch.rand(2, 6, 19, 19) > 0.3
    else:
        mask = torch.ones(2, 1, 1, 19, dtype=torch.bool)
        mask[1, ..., 12:] = False  # key padding on the second sequence
        if kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    cand = _candidate(((0, 4), (1, 2, 3), (5,)), (4, 2, 5), 6)
    ref = fam.reference(q, k, v, cand, scale=0.3, causal=True, attn_mask=mask)
    got = _run_kernel(q, k, v, cand, scale=0.3, causal=True, attn_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_operator_dispatches_to_cpu_kernel(causal):
    fam = get_family("shared")
    q, k, v = _qkv(1, 8, 2, 21, 21)
    cand = _candidate(((0, 1, 2, 3), (4, 5), (6,), (7,)), (1, 5, 6, 7), 8)
    config = json.dumps(
        {
            "site": "blk.attn#0",
            "family": "shared",
            "config": cand.config.to_json(),
            "mask_static": True,
            "window": None,
        }
    )
    got = op_for("shared")(q, k, v, None, cand.params, 0.25, causal, config)
    ref = fam.reference(q, k, v, cand, scale=0.25, causal=causal)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    bad = _candidate(((0, 1), (2, 3)), (0, 2), 4)
    bad_config = config.replace(json.dumps(cand.config.to_json()), json.dumps(bad.config.to_json()))
    with pytest.raises(ValueError, match="cover 8 query heads"):
        op_for("shared")(q, k, v, None, bad.params, 0.25, causal, bad_config)


def test_config_round_trip_and_params_validation():
    config = SharedConfig(clusters=((0, 3), (1,), (2,)), representatives=(3, 1, 2), threshold=0.95)
    assert SharedConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    cluster_of_head, reps = shared_params(config, 4)
    assert cluster_of_head.tolist() == [0, 1, 2, 0] and reps.tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match="partitioning"):
        shared_params(config, 5)
    with pytest.raises(ValueError, match="member of its cluster"):
        shared_params(SharedConfig(clusters=((0, 1),), representatives=(2,)), 2)


def _planted_stats(heads, kv_heads, n, groups, noise=0.02, samples=2):
    """Calibration samples where the heads of each planted group share (almost) the same q and k."""
    stats = SiteStats(site="blk.attn#0", scale=0.25, causal=True)
    n_rep = heads // kv_heads
    for _ in range(samples):
        q = torch.randn(1, heads, n, 16) * 2
        k = torch.randn(1, kv_heads, n, 16) * 2
        for group in groups:
            lead = group[0]
            for h in group[1:]:
                q[:, h] = q[:, lead] + noise * torch.randn(n, 16)
                k[:, h // n_rep] = k[:, lead // n_rep] if h // n_rep != lead // n_rep else k[:, h // n_rep]
        stats.q.append(q)
        stats.k.append(k)
        stats.v.append(torch.randn(1, kv_heads, n, 16))
        stats.attn_mask.append(None)
    return stats


def test_clustering_finds_planted_heads():
    stats = _planted_stats(8, 8, 48, groups=[(0, 3, 5), (1, 6)])
    sim = attention_similarity(stats)
    assert sim.shape == (8, 8)
    torch.testing.assert_close(sim.diagonal(), torch.ones(8))
    clusters, reps = cluster_heads(sim, 0.9)
    assert set(clusters) == {(0, 3, 5), (1, 6), (2,), (4,), (7,)}
    assert all(r in c for c, r in zip(clusters, reps))
    assert cluster_heads(sim, 0.9) == (clusters, reps)  # deterministic
    fam = get_family("shared")
    cands = fam.candidates(_site(8, 8), stats)
    assert cands and all(len(c.config.clusters) < 8 for c in cands)
    assert any(set(c.config.clusters) == set(clusters) for c in cands)


def test_candidates_use_calibrated_similarity_and_cost_drops():
    fam = get_family("shared")
    stats = SiteStats(site="blk.attn#0", scale=0.25, causal=True)
    sim = torch.eye(4)
    sim[0, 1] = sim[1, 0] = 0.97
    stats.head_similarity = sim
    site = _site(4, 2)
    cands = fam.candidates(site, stats)
    assert [c.config.clusters for c in cands] == [((0, 1), (2,), (3,))]
    shape = dict(B=1, H=4, Hkv=2, Nq=64, Nk=64, D=16, Dv=16, E=4)
    exact = get_family("exact").cost(site, None).evaluate(**shape)[0]
    flops = cands[0].cost.evaluate(**shape)[0]
    assert flops == pytest.approx(exact - 64 * 64 * (2 * 16 + 5) / 2)  # one score pass saved
    assert fam.candidates(site, SiteStats(site="x")) == []
    assert fam.unsupported_reason(_site(1, 1)) is not None


def test_selection_reuse_plan():
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(1, 4, 8, 8, generator=gen) > 0.5
    near = base.clone()
    near[0, 0, 0, :] = True  # a few blocks the leader lacks: recall just under 1, precision 1
    far = ~base
    plan = selection_reuse_plan({"l0": base, "l1": near, "l2": far, "l3": base.clone(), "l4": base[:, :2]})
    assert plan == {"l1": "l0", "l3": "l0"}  # l2 leads itself; l4 has another shape
    assert selection_reuse_plan({"a": base, "b": far | base}, min_precision=0.9) == {}
