"""The optimize/plan pipeline: explicit families that cannot serve a site, plan round trips."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt


class RawAttention(nn.Module):
    """Attention on given q/k/v: no projections for head pruning to cut."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_family_asked_for_on_a_site_it_cannot_serve_warns_and_stays_exact():
    torch.manual_seed(0)
    model = RawAttention()
    calls = [tuple(torch.randn(1, 4, 64, 16) for _ in range(3)) for _ in range(3)]
    with pytest.warns(UserWarning, match=r"'head_pruned' cannot serve site <root>#0: .*projections"):
        attnopt.optimize(model, "2x", calib=calls, families=("head_pruned",))
    assert all(e.family == "exact" for e in model._attnopt_plan.entries)
    q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
    torch.testing.assert_close(model(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_unknown_family_and_bad_budget_are_value_errors():
    model = RawAttention()
    calls = [tuple(torch.randn(1, 2, 8, 8) for _ in range(3))]
    with pytest.raises(ValueError, match="families"):
        attnopt.optimize(model, "2x", calib=calls, families=("magic",))
    with pytest.raises(ValueError, match="latency<="):
        attnopt.optimize(model, "fast please", calib=calls)
    with pytest.raises(ValueError, match="calibration example"):
        attnopt.optimize(model, "2x", calib=[])


def test_plan_save_load_apply_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    reference = copy.deepcopy(model)
    calls = [{"input_ids": torch.randint(0, 64, (1, 32)), "use_cache": False} for _ in range(3)]
    plan = attnopt.plan(model, "1.2x", calib=calls)
    assert "forward" not in model.__dict__  # plan() leaves the model as it was
    plan.save(tmp_path / "plan")
    loaded = attnopt.load_plan(tmp_path / "plan")
    assert [e.family for e in loaded.entries] == [e.family for e in plan.entries]
    attnopt.apply(model, loaded, example=calls[0])
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        want = reference(input_ids=ids, use_cache=False).logits
    from attnopt.pipeline import output_error

    # judged as the model is used: a causal LM by next-token divergence, labels or not
    assert loaded.budget.metric == "perplexity"
    err = output_error(got, want, "perplexity")
    assert err <= 2 * loaded.budget.tolerance, err  # the validated tolerance, with margin for a fresh input

    other = LlamaForCausalLM(
        LlamaConfig(**{**cfg.to_dict(), "num_attention_heads": 2, "num_key_value_heads": 2})
    ).eval()
    with pytest.raises(attnopt.PlanMismatchError, match=r"q_proj maps 32->16 features, the plan.s 32->32"):
        attnopt.apply(other, loaded)  # refused from the modules alone, without an example call
    with pytest.raises(ValueError, match="fingerprint|structure"):
        attnopt.apply(other, loaded, example=calls[0])




def test_plan_timings_keep_the_measurements_when_validation_re_solves(monkeypatch):
    """Validation re-solves with cached measurements; the reported timings must still hold the first ones."""
    import attnopt.pipeline as pipeline
    import attnopt.pipeline.validation as validation

    torch.manual_seed(3)
    model = RawAttention()
    calls = [tuple(torch.randn(1, 4, 1024, 16) for _ in range(3)) for _ in range(3)]
    seen = {}
    real_check, real_tighten = validation.end_to_end_check, validation.validate_and_tighten

    def failing_first(model, held, budget):
        check = real_check(model, held, budget)
        results = iter([1.0])  # the first plan "fails" end to end: one site goes exact, re-solve

        def fake(plan):
            return next(results, check(plan))

        fake.calls = check.calls
        return fake

    def spy(problem, plan, check):
        seen["first"] = dict(plan.timings)
        return real_tighten(problem, plan, check)

    monkeypatch.setattr(validation, "end_to_end_check", failing_first)
    monkeypatch.setattr(validation, "validate_and_tighten", spy)
    # planned for the H100 profile: predictions only, so the plan (and its re-solve) is deterministic
    run = pipeline.run_plan(model, "2x", calls, families=("block_sparse",), target="h100", progress=False)
    assert seen, "validation did not run"
    # planned on end-to-end errors: the failed check lowers the bound on their sum and re-solves
    tightened = [s for s in run.plan.steps if "re-solved with their sum bounded by" in s]
    assert tightened, run.plan.steps
    bound = float(tightened[0].rsplit(" ", 1)[-1])
    assert run.plan.totals["error"] <= bound * (1 + 1e-6)
    assert run.plan.timings["errors"] == pytest.approx(seen["first"]["errors"])  # not the re-solve's ~0
    assert seen["first"]["errors"] > 0.01
    assert {"capture", "calibrate", "candidates", "validate"} <= set(run.plan.timings)


class TwoSites(nn.Module):
    """Two attention sites on the same q/k/v; the model barely reads the second one's output."""

    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a + 1e-3 * b


def _local_qkv(n_calls: int, n: int = 1024) -> list[tuple[torch.Tensor, ...]]:
    """q = k = scaled positional features: attention concentrates near the diagonal."""
    pos = torch.arange(n).float()[:, None]
    freq = torch.exp(-torch.arange(8).float())[None]
    pe = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1)
    out = []
    for _ in range(n_calls):
        q = 4 * pe + 0.1 * torch.randn(1, 4, n, 16)
        out.append((q, q.clone(), torch.randn(1, 4, n, 16)))
    return out


def test_plans_are_chosen_on_end_to_end_errors_not_site_errors():
    """Both sites offer the same candidates with the same site errors; only the model's output
    tells them apart, and the plan must vary the site the output does not feel."""
    from attnopt.pipeline import run_plan

    torch.manual_seed(0)
    # one site's variant is enough for 1.15x (H100 predictions: deterministic latencies)
    run = run_plan(TwoSites(), "1.15x", _local_qkv(3), families=("block_sparse",), target="h100", progress=False)
    first, second = run.plan.entries
    assert first.family == "exact" and second.family == "block_sparse", run.plan.summary()
    assert second.end_to_end is not None and second.end_to_end < second.error / 100
    assert run.plan.feasible and run.plan.totals["speedup"] >= 1.15
    assert any(s.startswith("planned on end-to-end errors of") for s in run.plan.steps)
    summary = run.plan.summary()
    assert f"| {second.end_to_end:.3g} |" in summary and "summed end-to-end error" in summary


class _Out:
    def __init__(self, logits, loss=None):
        self.logits, self.loss = logits, loss


def test_perplexity_error_is_the_expected_increase_and_never_a_credit():
    from attnopt.pipeline import output_error

    torch.manual_seed(0)
    exact = torch.randn(2, 16, 10)
    planned = exact + 0.3 * torch.randn_like(exact)
    lp, lq = exact.log_softmax(-1), planned.log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    # the planned model happens to fit these labels better: the observed change is a gain,
    # but the error is the divergence, which is positive
    got = output_error(_Out(planned, torch.tensor(1.9)), _Out(exact, torch.tensor(2.0)), "perplexity")
    assert got == pytest.approx(math.expm1(kl), rel=1e-5) and got > 0
    # an observed loss increase larger than the divergence wins
    worse = output_error(_Out(planned, torch.tensor(2.5)), _Out(exact, torch.tensor(2.0)), "perplexity")
    assert worse == pytest.approx(math.exp(0.5) - 1, rel=1e-5)
    # no labels: the divergence alone; identical outputs: zero
    assert output_error(_Out(planned), _Out(exact), "perplexity") == pytest.approx(math.expm1(kl), rel=1e-5)
    assert output_error(_Out(exact), _Out(exact.clone()), "perplexity") == pytest.approx(0.0, abs=1e-7)
