"""A site has one name, whatever captured it and however the call reached the model.

transformers 5.24 wraps ``forward`` in decorators whose ``*args`` dynamo roots module paths at
(``L['args'][0].model.layers.0``); names read off such source strings broke every plan keyed by
``model.layers.0.self_attn#0``. Sites are now named by module identity where the capture records
it, and by a normaliser that drops the whole root expression where it does not.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import attnopt
from attnopt.patterns.canon import normalise_module_path
from attnopt.rewriter.backend import RewriteBackend

from ..zoo import by_name


def _dynamo_site_names(fn, args, kwargs, root: nn.Module | None) -> list[str]:
    backend = RewriteBackend(lambda site: None, root=root)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    return [name for c in backend.compiles for name in c["sites"]]


def _decorated(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class _Wrapped(nn.Module):
    """A model whose ``forward`` is wrapped by a decorator taking ``*args`` (as transformers 5.24's)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    @_decorated
    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


@pytest.mark.parametrize("name", ["llama-sdpa", "llama-eager", "bert-sdpa"])
def test_same_names_from_every_capture_and_call_form(name: str) -> None:
    entry = by_name(name)
    model, args, kwargs = entry.build()
    want = [s.name for s in attnopt.find_sites(model, *args, **kwargs)]  # torch.export
    assert want == [f"{e['module_path']}#0" for e in entry.expected]

    def through_a_wrapper(*a, **k):  # the model reached as a positional argument of a frame
        return model(*a, **k)

    forms = {
        "compile(model)": model,
        "compile(model.forward)": model.forward,
        "compile(type(model).forward) unbound": functools.partial(type(model).forward, model),
        "compile(wrapper function)": through_a_wrapper,
    }
    for form, fn in forms.items():
        assert _dynamo_site_names(fn, args, kwargs, root=model) == want, form
        # without the root's identities (torch.compile(model, backend=attnopt.backend())), the
        # normalised source strings must still give the model's own names
        assert _dynamo_site_names(fn, args, kwargs, root=None) == want, f"{form}, no root"



def test_decorated_forward_of_a_wrapper_module() -> None:
    """A decorated ``forward`` one module above the attention: names are from the wrapper's root."""
    model, args, kwargs = by_name("llama-sdpa").build()
    wrapped = _Wrapped(model).eval()
    want = [f"net.model.layers.{i}.self_attn#0" for i in range(2)]
    assert [s.name for s in attnopt.find_sites(wrapped, *args, **kwargs)] == want
    assert _dynamo_site_names(wrapped, args, kwargs, root=wrapped) == want
    assert _dynamo_site_names(wrapped, args, kwargs, root=None) == want


def test_symbolic_trace_agrees_with_export() -> None:
    from attnopt.api import capture_sites

    model, args, kwargs = by_name("einsum-bnhd").build()
    want = [s.name for s in attnopt.find_sites(model, *args, **kwargs)]
    _, traced = capture_sites(model, args, kwargs, methods=("symbolic_trace",))
    assert [s.name for s in traced] == want == ["blocks.0.attn#0", "blocks.1.attn#0"]


def test_by_parts_capture_names_from_the_root() -> None:
    """A model captured by parts (its top-level ``forward`` defeats export) names sites from the root."""
    from attnopt.api import capture_sites

    entry = by_name("torch-decoder")
    model, args, kwargs = entry.build()
    parts, sites = capture_sites(model, args, kwargs, methods=("export",))
    assert [p.path for p in parts] != [""], "expected capture by parts"
    want = [f"{e['module_path']}#{i}" for e, i in _indexed(entry.expected)]
    assert [s.name for s in sites] == want


def _indexed(expected):
    seen: dict[str, int] = {}
    for e in expected:
        i = seen.get(e["module_path"], 0)
        seen[e["module_path"]] = i + 1
        yield e, i


@pytest.mark.parametrize(
    ("recorded", "want"),
    [
        ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
        ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L['kwargs']['module'].encoder.layer[1]", "encoder.layer.1"),
        ("L['fn'].__self__._modules['model'].layers[2]", "model.layers.2"),
        ("L['self']._modules['h']._modules['0'].attn", "h.0.attn"),
        ("model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("getattr(L['self'].blocks, '3').attn", "blocks.3.attn"),
    ],
)
def test_normalise_module_path(recorded: str, want: str) -> None:
    assert normalise_module_path(recorded) == want
