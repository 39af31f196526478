"""attnopt as a new user meets it: the headline call without calib, options that can't be got
wrong, a metric that fits the model, and never a silent no-op."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import attnopt
from attnopt.deferred import DEFAULT_CALLS, is_planning_pending
from attnopt.pipeline import default_metric, resolve_exclude

from .rewriter.test_export import _llama_call, _tiny_llama
from .rewriter.test_hf_route import LOOSE, _calls, _llama, _variant_plan


def _logits(model, call):
    with torch.no_grad():
        return model(**call).logits


# -- the headline call: optimize(model, budget) with no calib -------------------------------------


def test_optimize_without_calib_plans_on_the_first_calls():
    torch.manual_seed(0)
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    assert attnopt.optimize(model, "2x", progress=False) is model
    assert attnopt.installed_plan(model) is None and is_planning_pending(model)
    for i in range(DEFAULT_CALLS):
        call = _llama_call(32)
        # the recorded calls run the model unchanged
        torch.testing.assert_close(_logits(model, call), _logits(reference, call))
        assert is_planning_pending(model) == (i < DEFAULT_CALLS - 1)
    plan = attnopt.installed_plan(model)
    assert plan is not None and [e.site for e in plan.entries] == [f"model.layers.{i}.self_attn#0" for i in range(2)]
    assert plan.budget.metric == "perplexity"  # a causal LM, judged by next-token divergence without labels
    fresh = _llama_call(32)
    from attnopt.pipeline import output_error

    assert output_error(_logits(model, fresh), _logits(reference, fresh), "perplexity") <= 2 * plan.budget.tolerance


def test_deferred_planning_skips_decode_steps_and_drops_the_cache():
    """generate()'s decode steps (one token against a cache) are not calibration calls."""
    torch.manual_seed(1)
    model = _tiny_llama()
    attnopt.optimize(model, "1x", calib_calls=2, progress=False)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)  # 1 prefill + 4 decode steps
    assert is_planning_pending(model), "decode steps were counted as calibration calls"
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not is_planning_pending(model) and attnopt.installed_plan(model) is not None
    with torch.no_grad():  # and generation goes on working under the plan
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16)


def test_deferred_planning_that_fails_leaves_the_model_exact(monkeypatch):
    """A first call that cannot be captured: the model runs unchanged, the warning names the methods."""
    import attnopt.rewriter.capture as capture

    def refuse(model, args, kwargs):
        raise RuntimeError("not today")

    monkeypatch.setattr(capture, "_METHODS", {name: refuse for name in capture.CAPTURE_METHODS})
    torch.manual_seed(2)
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    attnopt.optimize(model, "2x", calib_calls=1, progress=False)
    call = _llama_call(16)
    with pytest.warns(UserWarning, match=r"failed .*export: RuntimeError.*dynamo.*symbolic_trace.*runs unchanged"):
        got = _logits(model, call)
    torch.testing.assert_close(got, _logits(reference, call))
    assert "forward" not in model.__dict__ and attnopt.installed_plan(model) is None
    torch.testing.assert_close(_logits(model, call), _logits(reference, call))


# -- options ---------------------------------------------------------------------------------------


def test_unknown_and_mistyped_options_are_type_errors():
    model = _tiny_llama()
    calls = [_llama_call(16)]
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['budgett'\]. Accepted: .*calib_calls"):
        attnopt.optimize(model, "2x", calib=calls, budgett="3x")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['calib_calls'\]"):
        attnopt.plan(model, "2x", calib=calls, calib_calls=3)
    with pytest.raises(TypeError, match="exclude="):
        attnopt.optimize(model, "2x", calib=calls, exclude=3)
    with pytest.raises(TypeError, match="progress="):
        attnopt.optimize(model, "2x", calib=calls, progress="yes")
    with pytest.raises(TypeError, match="calib_calls"):
        attnopt.optimize(model, "2x", calib_calls=0)
    with pytest.raises(ValueError, match="latency<="):  # a bad budget fails at once, even deferred
        attnopt.optimize(model, "fast")
    assert "forward" not in model.__dict__


def test_exclude_takes_a_glob_a_list_or_a_predicate():
    model = _tiny_llama()
    sites = attnopt.find_sites(model, **_llama_call(16))
    names = [s.name for s in sites]
    assert resolve_exclude("model.layers.0.*", sites) == names[:1]  # a string is one glob
    assert resolve_exclude(["model.layers.1.*"], sites) == names[1:]
    with pytest.warns(UserWarning, match="'nothing\\*' matches no site"):
        resolve_exclude(["nothing*"], sites)
    assert resolve_exclude(lambda s: s.module_path.endswith("1.self_attn"), sites) == names[1:]
    assert resolve_exclude(None, sites) == []


def test_excluding_every_site_says_so():
    model = _tiny_llama()
    with pytest.warns(UserWarning, match="keeps every rewritable site exact"):
        attnopt.plan(model, "2x", calib=[_llama_call(16)], exclude="*", progress=False)


def test_public_exceptions_and_installed_plan():
    for name in ("PlanMismatchError", "CaptureError", "RewriteError", "ExportCheckError"):
        assert issubclass(getattr(attnopt, name), Exception)
    assert issubclass(attnopt.PlanMismatchError, ValueError)
    model = _tiny_llama()
    assert attnopt.installed_plan(model) is None
    attnopt.optimize(model, "1x", calib=[_llama_call(16)])
    assert attnopt.installed_plan(model) is model._attnopt_plan


def test_scope_model_plans_on_whole_model_time():
    torch.manual_seed(3)
    model = _tiny_llama()
    plan = attnopt.plan(model, attnopt.Budget(speedup=1.2, scope="model"), calib=[_llama_call(32)] * 2,
                        progress=False)
    assert plan.timings.get("model forward", 0) > 0
    assert plan.budget.scope == "model" and "whole model" in plan.headline()


# -- the metric fits the model ----------------------------------------------------------------------


def test_default_metric_follows_the_output():
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput

    assert default_metric(CausalLMOutput(logits=torch.zeros(1, 4, 10))) == "perplexity"
    assert default_metric(BaseModelOutput(last_hidden_state=torch.zeros(1, 4, 8))) == "cosine"
    st_out = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "sentence_embedding": torch.zeros(1, 8)}
    assert default_metric(st_out) == "cosine"
    assert default_metric(SequenceClassifierOutput(logits=torch.zeros(1, 3))) == "output_rel_error"
    assert default_metric(torch.zeros(2, 3)) == "output_rel_error"


def test_plan_report_names_metric_and_tolerance(tmp_path):
    model = _tiny_llama()
    plan = attnopt.plan(model, "1.1x", calib=[_llama_call(16)] * 2, progress=False)
    assert "perplexity" in plan.headline()
    plan.save(tmp_path / "p")
    report = (tmp_path / "p" / "report.md").read_text()
    assert "perplexity" in report and "0.015" in report


# -- never a silent no-op -----------------------------------------------------------------------------


def _other_llama(layers: int, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_a_plan_for_another_model_is_refused_without_an_example():
    model = _tiny_llama()  # 2 layers, 2 KV heads
    plan = attnopt.plan(model, "1x", calib=[_llama_call(16)])
    with pytest.raises(attnopt.PlanMismatchError, match="model.layers.2.self_attn .*not in the plan"):
        attnopt.apply(_other_llama(layers=3, kv_heads=2), plan)
    with pytest.raises(attnopt.PlanMismatchError, match="k_proj maps 32->32 features, the plan's 32->16"):
        attnopt.apply(_other_llama(layers=2, kv_heads=4), plan)
    with pytest.raises(attnopt.PlanMismatchError, match="model.layers.1.self_attn' not found"):
        attnopt.apply(_other_llama(layers=1, kv_heads=2), plan)
    attnopt.apply(_other_llama(layers=2, kv_heads=2), plan)  # same structure: accepted


@pytest.mark.parametrize("prefer_route", [True, False], ids=["registry-route", "graph-rewrite"])
def test_a_model_changed_after_planning_is_named_at_the_next_call(prefer_route):
    from attnopt.pipeline import install_plan

    model = _llama()
    run = _variant_plan(model)
    install_plan(model, run.plan, run.sites, prefer_route=prefer_route)
    _logits(model, _calls(1)[0])
    model.model.layers.append(copy.deepcopy(model.model.layers[1]))
    model.model.layers[2].self_attn.layer_idx = 2
    model.model.layers[2].self_attn.__dict__.pop("_attnopt_route", None)
    model.config.num_hidden_layers = 3
    with pytest.raises(
        attnopt.PlanMismatchError,
        match=r"site\(s\) the plan does not know: model.layers.2|a LlamaAttention is not",
    ):
        _logits(model, _calls(1)[0])


def test_an_exact_plan_installs_nothing_and_costs_nothing():
    model = _tiny_llama()
    attnopt.optimize(model, "1x", calib=[_llama_call(16)])
    assert "forward" not in model.__dict__ and model.config._attn_implementation == "sdpa"
    assert attnopt.installed_plan(model).headline().startswith("2 site(s): exact x2")


def test_a_plan_whose_sites_are_not_met_raises(monkeypatch):
    """Sites named differently at run time than at capture (the transformers 5.24 break) must raise."""
    import attnopt.rewriter.backend as backend

    real = backend.prefix_sites

    def misname(sites, prefix):
        real(sites, prefix)
        for s in sites:
            s.name = "0." + s.name

    monkeypatch.setattr(backend, "prefix_sites", misname)
    with pytest.raises(attnopt.PlanMismatchError, match="planned site\\(s\\) not found in the running model"):
        attnopt.optimize(_llama(), LOOSE, calib=_calls(2), families=("quantized", "block_sparse"), target="h100")


def test_speed_target_met_by_nothing_warns():
    torch.manual_seed(4)
    model = _tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnopt.optimize(model, "2x", calib=[_llama_call(16)] * 2, families=("quantized",), progress=False)
    # INT8 attention is an exact integer emulation on CPU, slower than SDPA: nothing can be chosen
    assert all(e.family == "exact" for e in model._attnopt_plan.entries)
    assert any("every attention site of LlamaForCausalLM stays exact" in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
