"""The site spec (attnopt.patterns.spec): real matches pass it, and every invariant has a case that fails it."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.patterns import find
from attnopt.patterns.context import GraphContext
from attnopt.patterns.find import find_sites_in_graph
from attnopt.patterns.rules import MATCHERS, PATTERNS, Matcher, by_anchor
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.spec import check_site, check_sites, site_problems
from attnopt.rewriter.capture import capture

# ------------------------------------------------------------------------------ real matches


class GQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Window(nn.Module):
    """Hand-written attention under a 3-key sliding window."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        ones = torch.ones(n, n, dtype=torch.bool, device=q.device)
        keep = ones.tril() & ~ones.tril(-3)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


class FoldedHeads(nn.Module):
    """``(B*H, N, D)`` attention with bmm, heads split from a projection."""

    def forward(self, x):
        b, n, e = x.shape
        h = 4
        t = x.view(b, n, h, e // h).transpose(1, 2).reshape(b * h, n, e // h)
        p = torch.softmax(torch.bmm(t, t.transpose(1, 2)) * (e // h) ** -0.5, dim=-1)
        return torch.bmm(p, t).view(b, h, n, e // h)


class Einsum(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


class Weights(nn.Module):
    """Returns its probabilities: a real site that is valid but not rewritable."""

    def forward(self, q, k, v):
        p = (q @ k.transpose(-1, -2)).softmax(-1)
        return p @ v, p


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _qkv(h: int = 4, hkv: int | None = None, n: int = 6, d: int = 8) -> tuple[torch.Tensor, ...]:
    hkv = hkv or h
    return torch.randn(2, h, n, d), torch.randn(2, hkv, n, d), torch.randn(2, hkv, n, d)


def _dynamo_sites(model: nn.Module, *args: Any) -> list[AttentionSite]:
    gm, flat = capture(model.eval(), args, methods=["dynamo"]).graphs[0]
    return find_sites_in_graph(GraphContext(gm, flat))


REAL: dict[str, Callable[[], AttentionSite]] = {
    "sdpa_gqa_causal": lambda: attnopt.find_sites(GQA(), *_qkv(8, 2))[0],
    "eager_sliding_window": lambda: attnopt.find_sites(Window(), *_qkv())[0],
    "eager_bh_folded": lambda: attnopt.find_sites(FoldedHeads(), torch.randn(2, 6, 32))[0],
    "eager_einsum": lambda: attnopt.find_sites(Einsum(), *(torch.randn(2, 6, 4, 8) for _ in range(3)))[0],
    "eager_kept_weights": lambda: attnopt.find_sites(Weights(), *_qkv())[0],
    "mha_functional": lambda: _dynamo_sites(MHA(), torch.randn(2, 5, 16))[0],
}


@pytest.mark.parametrize("name", list(REAL))
def test_sites_from_real_matches_pass(name: str) -> None:
    site = REAL[name]()
    assert site_problems(site) == [], site
    check_site(site)
    assert site.pattern in PATTERNS


def test_real_matches_cover_every_layout_and_the_expected_facts() -> None:
    sites = {name: build() for name, build in REAL.items()}
    assert {s.layout for s in sites.values()} == {"bhnd", "(bh)nd", "einsum", "nbe"}
    assert (sites["sdpa_gqa_causal"].num_heads, sites["sdpa_gqa_causal"].num_kv_heads) == (8, 2)
    assert (sites["eager_sliding_window"].mask, sites["eager_sliding_window"].window) == ("sliding_window", 3)
    assert sites["mha_functional"].pattern == "mha_functional"
    assert not sites["eager_kept_weights"].rewritable and sites["eager_kept_weights"].reason


def test_a_size_left_symbolic_without_a_hint_is_allowed() -> None:
    site = dataclasses.replace(REAL["sdpa_gqa_causal"](), graph=None, batch=-1, q_len=-1, kv_len=-1)
    check_site(site)


# -------------------------------------------------------------------------- hand-broken sites


def _site(base: str = "sdpa_gqa_causal", **changes: Any) -> AttentionSite:
    """A real site with ``changes`` applied; ``graph`` dropped so only the change is wrong."""
    site = dataclasses.replace(REAL[base](), graph=None)
    for k, v in changes.items():
        setattr(site, k, v)  # setattr, not replace(): __post_init__ would reject a bad mask first
    return site


#: (case id, base site, changes, text the error must contain)
BROKEN: list[tuple[str, str, dict[str, Any], str]] = [
    # identity
    ("negative_index", "sdpa_gqa_causal", {"index": -1}, "index to be an int >= 0"),
    ("name_without_index", "sdpa_gqa_causal", {"name": "<root>"}, "name to end with '#0'"),
    ("unknown_pattern", "sdpa_gqa_causal", {"pattern": "flash"}, "pattern to be one of"),
    # heads and head dims
    ("heads_not_divisible", "sdpa_gqa_causal", {"num_heads": 6, "num_kv_heads": 4}, "divisible"),
    ("zero_heads", "sdpa_gqa_causal", {"num_heads": 0}, "num_heads to be a positive int"),
    ("zero_kv_heads", "sdpa_gqa_causal", {"num_kv_heads": 0}, "num_kv_heads to be a positive int"),
    ("bool_heads", "sdpa_gqa_causal", {"num_heads": True}, "num_heads to be a positive int"),
    ("zero_head_dim", "sdpa_gqa_causal", {"head_dim": 0}, "head_dim to be a positive int"),
    ("negative_head_dim_v", "sdpa_gqa_causal", {"head_dim_v": -8}, "head_dim_v to be a positive int"),
    # sizes
    ("zero_batch", "sdpa_gqa_causal", {"batch": 0}, "batch to be a positive int"),
    ("zero_q_len", "sdpa_gqa_causal", {"q_len": 0}, "q_len to be a positive int"),
    ("negative_kv_len", "sdpa_gqa_causal", {"kv_len": -2}, "kv_len to be a positive int"),
    ("float_q_len", "sdpa_gqa_causal", {"q_len": 6.0}, "q_len to be a positive int"),
    # scale
    ("nan_scale", "sdpa_gqa_causal", {"scale": float("nan")}, "scale to be a finite, nonzero float"),
    ("inf_scale", "sdpa_gqa_causal", {"scale": float("inf")}, "scale to be a finite, nonzero float"),
    ("zero_scale", "sdpa_gqa_causal", {"scale": 0.0}, "scale to be a finite, nonzero float"),
    ("str_scale", "sdpa_gqa_causal", {"scale": "0.35"}, "scale to be a finite, nonzero float"),
    # mask, window, causality
    ("unknown_mask", "sdpa_gqa_causal", {"mask": "alibi"}, "mask to be one of"),
    ("window_missing", "eager_sliding_window", {"window": None}, "positive int window"),
    ("window_zero", "eager_sliding_window", {"window": 0}, "positive int window"),
    ("window_without_sliding", "sdpa_gqa_causal", {"window": 4}, "window=None unless"),
    ("causal_mask_not_causal", "sdpa_gqa_causal", {"causal": False}, "causal=True with mask='causal'"),
    ("window_mask_not_causal", "eager_sliding_window", {"causal": False}, "causal=True with mask='sliding"),
    ("no_mask_but_causal", "eager_einsum", {"causal": True}, "causal=False with mask='none'"),
    ("causal_not_bool", "sdpa_gqa_causal", {"causal": 1}, "causal to be a bool"),
    # dropout, layout, flags
    ("dropout_out_of_range", "eager_kept_weights", {"dropout": 1.5}, "dropout in [0, 1]"),
    ("rewritable_with_dropout", "sdpa_gqa_causal", {"dropout": 0.1}, "dropout=0 on a rewritable site"),
    ("unknown_layout", "sdpa_gqa_causal", {"layout": "hbnd"}, "layout to be one of"),
    ("mask_static_not_bool", "sdpa_gqa_causal", {"mask_static": None}, "mask_static to be a bool"),
    ("cross_not_bool", "sdpa_gqa_causal", {"cross": "no"}, "cross to be a bool"),
    # rewritability
    ("rewritable_with_reason", "sdpa_gqa_causal", {"reason": "why"}, "reason=None on a rewritable site"),
    ("kept_without_reason", "eager_kept_weights", {"reason": None}, "a reason on a site that is not"),
    ("kept_with_empty_reason", "eager_kept_weights", {"reason": ""}, "a reason on a site that is not"),
    ("rewritable_not_bool", "sdpa_gqa_causal", {"rewritable": 1}, "rewritable to be a bool"),
    # projections, dtype, graph
    ("unknown_projection", "sdpa_gqa_causal", {"projections": {"out": "o_proj"}}, "projections to map"),
    ("projection_not_a_path", "sdpa_gqa_causal", {"projections": {"q": 3}}, "projections to map"),
    ("packed_and_split", "sdpa_gqa_causal", {"projections": {"qkv": "a", "q": "b"}}, "a packed 'qkv'"),
    ("empty_dtype", "sdpa_gqa_causal", {"dtype": ""}, "dtype to be a non-empty str"),
    ("graph_not_a_match", "sdpa_gqa_causal", {"graph": object()}, "graph to be None or a SiteMatch"),
]


@pytest.mark.parametrize(("base", "changes", "text"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_each_broken_invariant_is_named(base: str, changes: dict[str, Any], text: str) -> None:
    site = _site(base, **changes)
    with pytest.raises(ValueError, match="Invalid attention site") as e:
        check_site(site)
    assert repr(site.name) in str(e.value) and text in str(e.value), str(e.value)
    assert any(text in p for p in site_problems(site))


def test_site_and_match_must_agree() -> None:
    site = REAL["sdpa_gqa_causal"]()
    site.num_kv_heads = 4  # still divides 8, but the rewriter would act on the match's 2
    with pytest.raises(ValueError, match="num_kv_heads to agree with the graph match"):
        check_site(site)


def test_check_sites_names_every_invalid_site() -> None:
    good = REAL["sdpa_gqa_causal"]()
    bad1 = _site(q_len=0, name="a#0")
    bad2 = _site(scale=float("nan"), name="b#0")
    check_sites([good])
    with pytest.raises(ValueError, match=r"Invalid attention site\(s\) \(2\)") as e:
        check_sites([good, bad1, bad2])
    assert "'a#0'" in str(e.value) and "'b#0'" in str(e.value) and repr(good.name) not in str(e.value)


# ------------------------------------------------------------------- where the check runs


def test_find_keeps_a_match_that_breaks_the_spec_out_of_rewriting(monkeypatch, caplog) -> None:
    """A matcher that got the heads wrong: the site is listed, kept as the model's code, with the reason."""
    sdpa = next(m for m in MATCHERS if m.name == "sdpa")

    def wrong_heads(ctx, node, op):
        m = sdpa.match(ctx, node, op)
        m.num_kv_heads = 3
        return m

    table = [Matcher("sdpa", sdpa.anchors, wrong_heads), *(m for m in MATCHERS if m.name != "sdpa")]
    monkeypatch.setattr(find, "by_anchor", lambda: by_anchor(table))
    with caplog.at_level(logging.WARNING, logger="attnopt.patterns"):
        (site,) = attnopt.find_sites(GQA(), *_qkv(8, 2))
    assert not site.rewritable and "breaks the site spec" in site.reason and "divisible" in site.reason
    assert site.name in caplog.text


def test_rewriting_checks_its_sites_before_changing_the_graph() -> None:
    from attnopt.rewriter.rewrite import Choice, rewrite_graph

    q, k, v = _qkv(8, 2)
    gm, flat = capture(GQA(), (q, k, v), methods=["export"]).graphs[0]
    (site,) = find_sites_in_graph(GraphContext(gm, flat))
    before = [str(n.target) for n in gm.graph.nodes]
    site.num_kv_heads = 4  # edited after matching: the match still says 2
    with pytest.raises(ValueError, match="num_kv_heads to agree with the graph match"):
        rewrite_graph(gm, [site], {site.name: Choice("exact")})
    assert [str(n.target) for n in gm.graph.nodes] == before
    site.num_kv_heads = 2
    assert rewrite_graph(gm, [site], {site.name: Choice("exact")}) == 1
    torch.testing.assert_close(gm(*flat)[0] if isinstance(gm(*flat), tuple) else gm(*flat), GQA()(q, k, v))
