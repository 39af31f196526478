"""Matchers on hand-written forms: every spelling of the same attention, and things that are not attention."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.pipeline import run_plan
from attnopt.rewriter.install import installed_backends


class Heads(nn.Module):
    """Attention written in a configurable way; everything else fixed."""

    def __init__(self, form: str, d: int = 32, h: int = 4):
        super().__init__()
        self.form, self.h, self.hd = form, h, d // h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.hd)
        k = self.k(x).view(b, n, self.h, self.hd)
        v = self.v(x).view(b, n, self.h, self.hd)
        f = self.form
        if f == "einsum_bnhd":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.hd)
            out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
            return self.o(out.reshape(b, n, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if f == "div_scale":
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        elif f == "prescaled_q":
            s = (q * self.hd**-0.5) @ k.transpose(-2, -1)
        elif f == "no_scale":
            s = q @ k.transpose(-1, -2)
        elif f == "k_given_transposed":
            kt = k.permute(0, 1, 3, 2)
            s = torch.matmul(q, kt) * self.hd**-0.5
        elif f == "where_causal":
            s = q @ k.transpose(-1, -2) * self.hd**-0.5
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            s = torch.where(keep, s, torch.tensor(float("-inf")))
        elif f == "upcast_softmax_bmm":
            qb, kb, vb = (t.reshape(b * self.h, n, self.hd) for t in (q, k, v))
            s = torch.bmm(qb, kb.transpose(1, 2)) * self.hd**-0.5
            p = F.softmax(s.float(), dim=-1).to(qb.dtype)
            return self.o(torch.bmm(p, vb).view(b, self.h, n, self.hd).transpose(1, 2).reshape(b, n, -1))
        elif f == "inplace_ops":
            s = q @ k.transpose(-1, -2)
            s /= math.sqrt(self.hd)
            s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        elif f in ("baddbmm_kwargs_regrouped", "computed_scale_on_kt"):
            return self.o(self._bh(f, q, k, v).view(b, self.h, n, self.hd).transpose(1, 2).reshape(b, n, -1))
        else:
            raise AssertionError(f)
        p = F.dropout(s.softmax(dim=-1), p=0.1, training=self.training)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, -1))

    def _bh(self, f: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Bloom/DeBERTa-style ``(B*H, N, D)`` attention; the scores are viewed as (B, H, N, N) to softmax."""
        b, h, n, d = q.shape
        qb, kb, vb = (t.reshape(b * h, n, d) for t in (q, k, v))
        if f == "baddbmm_kwargs_regrouped":
            zero_bias = torch.zeros(b * h, 1, n, device=q.device)
            s = zero_bias.baddbmm(batch1=qb, batch2=kb.transpose(1, 2), beta=1.0, alpha=d**-0.5)
        else:
            s = torch.bmm(qb, kb.transpose(-1, -2) / torch.sqrt(torch.tensor(float(d)) * 1))
        p = s.view(b, h, n, n).softmax(dim=-1)
        return torch.bmm(p.view(b * h, n, n), vb)


FORMS = {
    "einsum_bnhd": (8**-0.5, "none"),
    "div_scale": (8**-0.5, "none"),
    "prescaled_q": (8**-0.5, "none"),
    "no_scale": (1.0, "none"),
    "k_given_transposed": (8**-0.5, "none"),
    "where_causal": (8**-0.5, "causal"),
    "upcast_softmax_bmm": (8**-0.5, "none"),
    "inplace_ops": (8**-0.5, "causal"),
    "baddbmm_kwargs_regrouped": (8**-0.5, "none"),
    "computed_scale_on_kt": (8**-0.5, "none"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_spelling_is_one_site_and_rewrites_exactly(form):
    torch.manual_seed(0)
    model = Heads(form).eval()
    x = torch.randn(2, 10, 32)
    sites = attnopt.find_sites(model, x)
    scale, mask = FORMS[form]
    assert len(sites) == 1, sites
    s = sites[0]
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.mask, s.cross) == (4, 4, 8, mask, False)
    assert s.scale == pytest.approx(scale)
    assert s.rewritable, s.reason
    assert s.projections.get("q") == "q" and s.projections.get("o") == "o"
    original = _fresh(model, form)
    run_plan(model, "1x", [x], progress=False)  # leaves the site on attnopt's exact operator
    x2 = torch.randn(2, 10, 32)
    torch.testing.assert_close(model(x2), original(x2), rtol=1e-5, atol=1e-5)
    (backend,) = installed_backends(model).values()
    assert backend.compiles[-1]["rewritten"] == 1


def _fresh(model, form):
    fresh = Heads(form).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.experts = nn.Linear(32, 4), nn.Parameter(torch.randn(4, 32))

    def forward(self, x):
        return torch.softmax(self.gate(x), dim=-1) @ self.experts


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(32, 10)

    def forward(self, x):
        return F.softmax(self.f(x).mean(1), dim=-1)


class SelfSimilarity(nn.Module):
    """softmax(x xᵀ) without any value multiplication: not attention."""

    def forward(self, x):
        return torch.softmax(x @ x.transpose(-1, -2), -1).sum(-1)


@pytest.mark.parametrize("cls", [Router, Classifier, SelfSimilarity])
def test_softmax_that_is_not_attention_is_not_reported(cls):
    model = cls().eval()
    assert attnopt.find_sites(model, torch.randn(2, 6, 32)) == []


def test_model_without_attention_is_returned_unchanged_with_a_warning():
    model = Router().eval()
    x = torch.randn(2, 6, 32)
    with pytest.warns(UserWarning, match="0 attention sites"):
        out = attnopt.optimize(model, "2x", calib=[x])
    assert out is model and "forward" not in model.__dict__


def test_returned_attention_weights_keep_the_site_exact_with_a_reason():
    class Weights(nn.Module):
        def forward(self, q, k, v):
            p = (q @ k.transpose(-1, -2)).softmax(-1)
            return p @ v, p

    (s,) = attnopt.find_sites(Weights(), *(torch.randn(1, 2, 5, 4) for _ in range(3)))
    assert not s.rewritable and "outside the attention" in s.reason


def test_tanh_softcap_is_listed_but_not_rewritable():
    class Softcap(nn.Module):
        def forward(self, q, k, v):
            s = torch.tanh((q @ k.transpose(-1, -2)) / 30.0) * 30.0
            return s.softmax(-1) @ v

    (s,) = attnopt.find_sites(Softcap(), *(torch.randn(1, 2, 5, 4) for _ in range(3)))
    assert not s.rewritable and "soft-capping" in s.reason


def test_sdpa_flags_scale_and_gqa():
    class GQA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)

    q, k, v = torch.randn(1, 8, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    (s,) = attnopt.find_sites(GQA(), q, k, v)
    assert (s.num_heads, s.num_kv_heads, s.causal, s.mask, s.scale) == (8, 2, True, "causal", 0.3)


def test_repeat_interleave_mqa_is_folded():
    class MQA(nn.Module):
        def forward(self, q, k, v):
            k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    (s,) = attnopt.find_sites(MQA(), q, k, v)
    assert (s.num_heads, s.num_kv_heads) == (4, 1)


def test_example_that_does_not_run_gives_the_models_error_with_context():
    model = Heads("div_scale").eval()
    with pytest.raises(RuntimeError, match="attnopt: the example call does not run"):
        attnopt.find_sites(model, torch.randn(2, 10, 7))
