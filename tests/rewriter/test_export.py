"""torch.export and MLIR export of optimised models: attnopt ops in the program, same outputs,
save/load round trip, SDPA for exact sites and ``attnopt.<family>`` operators for the others."""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.cost_model.plan import PlanEntry
from attnopt.pipeline import install_plan
from attnopt.replacements.exact import attention_reference
from attnopt.replacements.quantized import QuantizedConfig
from attnopt.replacements.shared import SharedConfig, shared_params
from attnopt.rewriter.export import ExportCheckError, attnopt_nodes, export, export_mlir, mlir_op_library

needs_mlir = pytest.mark.skipif(
    importlib.util.find_spec("torch_mlir") is None,
    reason="torch-mlir (the attnopt[mlir] extra) is not installed",
)

_MLIR_ATTENTION = re.compile(
    r'torch\.operator "torch\.attnopt\.(\w+)"|torch\.aten\.scaled_dot_product_attention'
)


def _families(program) -> list[str]:
    return sorted(n.target._opname for n in attnopt_nodes(program))


def _mlir_attention(text: str) -> list[str]:
    return sorted(m.group(1) or "sdpa" for m in _MLIR_ATTENTION.finditer(text))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return LlamaForCausalLM(cfg).eval()


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def _llama_call(n: int = 16) -> dict:
    return {"input_ids": torch.randint(0, 64, (1, n)), "use_cache": False}


def _bert_call() -> dict:
    ids = torch.randint(0, 50, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _set_entries(model: nn.Module, families: dict[int, tuple[str, dict, list]], prefer_route: bool = True) -> None:
    """Install a hand-made plan: ``families[i] = (family, config json, params)`` for site ``i``.

    ``prefer_route=False`` installs the graph rewrite on a Hugging Face model too."""
    plan, sites = model._attnopt_plan, model._attnopt_sites
    entries = [PlanEntry(site=s.name, family="exact", config={}) for s in sites]
    for i, (fam, cfg, params) in families.items():
        entries[i] = PlanEntry(site=sites[i].name, family=fam, config=cfg, params=list(params))
    plan.entries = entries
    install_plan(model, plan, sites, prefer_route=prefer_route)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    call = _llama_call()
    attnopt.optimize(model, "1x", calib=[call])
    return model, reference, call


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(1)
    model = _tiny_bert()
    reference = copy.deepcopy(model)
    call = _bert_call()
    attnopt.optimize(model, "1x", calib=[call])
    return model, reference, call


@pytest.fixture(scope="module")
def llama_program(llama, tmp_path_factory):
    """The exact-plan Llama exported once and saved: (program, path of the .pt2, wrapper seen before)."""
    model, _, call = llama
    before = model.__dict__.get("forward")  # None: an all-exact plan installs nothing
    program = export(model, call)
    path = tmp_path_factory.mktemp("export") / "llama.pt2"
    torch.export.save(program, path)
    return program, path, before


def test_exact_plan_exports_attnopt_ops_and_round_trips(llama, llama_program):
    model, reference, _ = llama
    program, path, before = llama_program
    assert model.__dict__.get("forward") is before  # the model is as it was after export
    assert _families(program) == ["exact", "exact"]
    assert not any(
        n.target == torch.ops.aten.scaled_dot_product_attention.default for n in program.graph.nodes
    )
    fresh = _llama_call()  # same shape (the program is specialised to it), new values
    with torch.no_grad():
        want = _main_output(reference(**fresh))
        torch.testing.assert_close(_main_output(program.module()(**fresh)), want)
        loaded = torch.export.load(path)
        assert _families(loaded) == ["exact", "exact"]
        torch.testing.assert_close(_main_output(loaded.module()(**fresh)), want)


@pytest.mark.slow
def test_saved_program_loads_in_a_fresh_interpreter(llama, llama_program, tmp_path):
    """``torch.export.load`` needs the attnopt ops registered (``import attnopt``) and the output's
    pytree type (``transformers.modeling_outputs``); nothing else of the session."""
    _, reference, _ = llama
    _, path, _ = llama_program
    call = _llama_call()
    torch.save({"call": call, "want": _main_output(reference(**call)).detach()}, tmp_path / "io.pt")
    script = (
        "import sys, torch, attnopt, transformers.modeling_outputs\n"
        f"ep = torch.export.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "assert any(n.target == torch.ops.attnopt.exact.default for n in ep.graph.nodes)\n"
        "torch.testing.assert_close(ep.module()(**io['call']).logits, io['want'])\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=170)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@needs_mlir
def test_non_exact_plan_with_fitted_params_exports_and_round_trips(tmp_path):
    torch.manual_seed(2)
    model = _tiny_llama()
    call = _llama_call(32)
    attnopt.optimize(model, "1x", calib=[call])
    # heads {0, 1} share head 1's scores, heads {2, 3} head 2's: a plan with fitted tensors.
    shared = SharedConfig(clusters=((0, 1), (2, 3)), representatives=(1, 2), threshold=0.9)
    params = shared_params(shared, 4)
    assert params, "the shared family should carry fitted tensors"
    _set_entries(
        model, {0: ("shared", shared.to_json(), params), 1: ("quantized", QuantizedConfig().to_json(), [])}
    )
    program = export(model, call)
    assert _families(program) == ["quantized", "shared"]
    assert len(program.constants) >= len(params)  # fitted tensors travel with the program
    fresh = _llama_call(32)
    with torch.no_grad():
        want = _main_output(model(**fresh))  # the optimised model runs the same kernels
        torch.testing.assert_close(_main_output(program.module()(**fresh)), want)
        torch.export.save(program, tmp_path / "planned.pt2")
        loaded = torch.export.load(tmp_path / "planned.pt2")
        assert _families(loaded) == ["quantized", "shared"]
        torch.testing.assert_close(_main_output(loaded.module()(**fresh)), want)
    text = export_mlir(program, path=tmp_path / "planned.mlir")  # from the program: no second export
    assert _mlir_attention(text) == ["quantized", "shared"]
    assert (tmp_path / "planned.mlir").read_text() == text


@needs_mlir
def test_bert_exact_exports_and_mlir_keeps_sdpa(bert, tmp_path):
    model, reference, call = bert
    program = export(model, call)
    assert _families(program) == ["exact", "exact"]
    with torch.no_grad():
        got, want = _main_output(program.module()(**call)), _main_output(reference(**call))
    torch.testing.assert_close(got, want)
    text = export_mlir(model, call, tmp_path / "bert.mlir")
    assert _mlir_attention(text) == ["sdpa", "sdpa"]
    assert "attnopt" not in text


@needs_mlir
def test_bert_mixed_plan_mlir_names_the_variant():
    torch.manual_seed(3)
    model = _tiny_bert()
    call = _bert_call()
    attnopt.optimize(model, "1x", calib=[call])
    _set_entries(model, {0: ("quantized", QuantizedConfig().to_json(), [])})
    program = export(model, call, exact_as_sdpa=True)
    assert _families(program) == ["quantized"]
    with torch.no_grad():
        torch.testing.assert_close(_main_output(program.module()(**call)), _main_output(model(**call)))
    text = export_mlir(program)  # lowered to the torch backend contract: the op survives
    assert _mlir_attention(text) == ["quantized", "sdpa"]


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_exact_becomes_sdpa_only_where_semantics_match():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    model = _Attention()
    attnopt.optimize(model, "1x", calib=[(q, k, v)])
    program = export(model, (q, k, v), exact_as_sdpa=True)
    assert not attnopt_nodes(program)
    want = attention_reference(q, k, v, None, scale=16**-0.5, causal=True, window=None)
    torch.testing.assert_close(program.module()(q, k, v), want)

    # Nq != Nk: SDPA's causal is top-left aligned, the op's bottom-right; the op stays.
    q2, k2, v2 = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    model2 = _Attention()
    attnopt.optimize(model2, "1x", calib=[(q2, k2, v2)])
    program2 = export(model2, (q2, k2, v2), exact_as_sdpa=True)
    assert _families(program2) == ["exact"]
    torch.testing.assert_close(
        program2.module()(q2, k2, v2), F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    )


def test_export_needs_an_optimised_model():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="optimised by attnopt"):
        export(_Attention(), (q, q, q))
    with pytest.raises(TypeError, match="nn.Module"):
        export(lambda x: x, (q,))


def test_export_check_catches_a_program_that_differs(monkeypatch):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    model = _Attention()
    attnopt.optimize(model, "1x", calib=[(q, k, v)])
    import attnopt.rewriter.torch_export as ex

    real = ex._rewritten_module

    def broken(*a, **kw):
        gm, sites, n = real(*a, **kw)
        for node in attnopt_nodes(gm):  # drop the causal constraint: a wrong rewrite
            node.args = (*node.args[:6], False, *node.args[7:])
        gm.recompile()
        return gm, sites, n

    monkeypatch.setattr(ex, "_rewritten_module", broken)
    with pytest.raises(ExportCheckError, match="match the optimised model"):
        export(model, (q, k, v))
    assert export(model, (q, k, v), check=False) is not None


def test_export_mlir_validates_arguments(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    model = _Attention()
    attnopt.optimize(model, "1x", calib=[(q, q, q)])
    with pytest.raises(ValueError, match="output_type"):
        export_mlir(model, (q, q, q), output_type="llvm")
    monkeypatch.setitem(sys.modules, "torch_mlir", None)
    with pytest.raises(ImportError, match=r"pip install attnopt\[mlir\]"):
        export_mlir(model, (q, q, q))


def test_mlir_library_names_every_operator():
    lib = mlir_op_library()
    for fam in ("exact", "block_sparse", "quantized", "linear", "shared"):
        for kind in ("shape", "dtype", "has_value_semantics"):
            assert f'@"__torch_mlir_{kind}_fn.torch.attnopt.{fam}"' in lib


@needs_mlir
@pytest.mark.parametrize("output_type", ["linalg-on-tensors", "tosa"])
def test_exact_only_model_lowers_past_the_torch_dialect(output_type):
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    attnopt.optimize(layer, "1x", calib=[(x,)])
    text = export_mlir(layer, (x,), output_type=output_type)
    assert "attnopt" not in text and "torch.aten" not in text  # fully lowered
    assert ("linalg." if output_type == "linalg-on-tensors" else "tosa.") in text


@pytest.mark.parametrize("prefer_route", [True, False], ids=["registry-route", "graph-rewrite"])
def test_plain_torch_export_of_an_optimised_model_holds_the_plans_operators(tmp_path, prefer_route):
    """``torch.export.export(optimized_model, ...)`` itself (not only attnopt.export) carries the plan,
    whether it runs through transformers' AttentionInterface or the graph rewrite."""
    torch.manual_seed(3)
    model = _tiny_llama()
    call = _llama_call(32)
    attnopt.optimize(model, "1x", calib=[call])
    _set_entries(model, {1: ("quantized", QuantizedConfig().to_json(), [])}, prefer_route=prefer_route)
    program = torch.export.export(model, (), call)
    sdpa = [n for n in program.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    if prefer_route:  # the exact site runs transformers' own SDPA call
        assert _families(program) == ["quantized"] and len(sdpa) == 1
    else:
        assert _families(program) == ["exact", "quantized"] and not sdpa
    fresh = _llama_call(32)
    with torch.no_grad():
        want = _main_output(model(**fresh))  # the optimised model's own kernels
        torch.testing.assert_close(_main_output(program.module()(**fresh)), want)
        torch.export.save(program, tmp_path / "plain.pt2")
        loaded = torch.export.load(tmp_path / "plain.pt2")
        assert _families(loaded) == _families(program)
        torch.testing.assert_close(_main_output(loaded.module()(**fresh)), want)


def test_plain_torch_export_warns_about_hand_written_attention():
    """Eager (matmul/softmax) attention has no call to route: exported as written, with a warning."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    call = _llama_call(16)
    attnopt.optimize(model, "1x", calib=[call])
    _set_entries(model, {0: ("quantized", QuantizedConfig().to_json(), [])}, prefer_route=False)
    site = model._attnopt_sites[0].name
    with pytest.warns(UserWarning, match=re.escape(site) + ".*attnopt.export"):
        program = torch.export.export(model, (), call)
    assert _families(program) == []
    assert _families(export(model, call)) == ["quantized"]  # attnopt.export rewrites the graph instead
    # routed through transformers' AttentionInterface, the eager model's site is a call like any other
    _set_entries(model, {0: ("quantized", QuantizedConfig().to_json(), [])})
    assert _families(torch.export.export(model, (), call)) == ["quantized"]
