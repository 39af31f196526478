"""Budget parsing: every accepted form, the validation of each field, and the rejected forms."""

from __future__ import annotations

import math

import pytest

from attnopt.cost_model.budget import DEFAULT_MAX_ERROR, Budget, parse_budget


@pytest.mark.parametrize(
    ("text", "speedup", "latency_ms"),
    [
        ("2x", 2.0, None),
        ("1.5x", 1.5, None),
        ("1.5X", 1.5, None),
        (" 3 x ", 3.0, None),
        ("latency<=4ms", None, 4.0),
        ("latency <= 800us", None, 0.8),
        ("latency<=250µs", None, 0.25),
        ("latency<=1s", None, 1000.0),
        (2, 2.0, None),
        (2.5, 2.5, None),
    ],
)
def test_accepted_forms(text, speedup, latency_ms):
    b = parse_budget(text)
    assert b.speedup == speedup
    assert (b.latency_ms is None) == (latency_ms is None)
    if latency_ms is not None:
        assert math.isclose(b.latency_ms, latency_ms)
    assert b.max_error is None and b.tolerance == DEFAULT_MAX_ERROR
    assert b.has_speed_target and not b.exact


@pytest.mark.parametrize("form", ["1x", "1X", 1, 1.0, None])
def test_one_x_and_none_mean_exact(form):
    b = parse_budget(form)
    assert b.speedup == 1.0 and b.exact and b.tolerance == 0.0 and not b.has_speed_target


def test_budget_passes_through_and_round_trips():
    b = Budget(speedup=2.0, max_error=0.05, metric="cosine", scope="model")
    assert parse_budget(b) is b
    assert Budget.from_json(b.to_json()) == b
    assert "2x" in b.describe() and "cosine" in b.describe()
    assert Budget(max_error=0.1).describe().startswith("fastest")


def test_newer_budget_version_is_refused():
    d = Budget(speedup=2.0).to_json()
    d["version"] = Budget.VERSION + 1
    with pytest.raises(ValueError, match="newer"):
        Budget.from_json(d)


@pytest.mark.parametrize(
    "bad",
    ["0.5x", "fast", "2", "x", "latency<=0ms", "latency<=-1ms", "latency<=4h", "", float("nan"), 0.9, -3],
)
def test_rejected_values_list_accepted_forms(bad):
    with pytest.raises(ValueError, match="latency<=4ms"):
        parse_budget(bad)


@pytest.mark.parametrize("bad", [True, [2], {"speedup": 2}, object()])
def test_rejected_types(bad):
    with pytest.raises(TypeError, match="Expected"):
        parse_budget(bad)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"speedup": 0.5}, ValueError, "speedup >= 1"),
        ({"speedup": float("inf")}, ValueError, "finite"),
        ({"latency_ms": 0.0}, ValueError, "latency_ms > 0"),
        ({"latency_ms": -2.0}, ValueError, "latency_ms > 0"),
        ({"speedup": 2.0, "latency_ms": 3.0}, ValueError, "either speedup or latency_ms"),
        ({"max_error": -0.1}, ValueError, "max_error >= 0"),
        ({"max_error": float("nan")}, ValueError, "max_error >= 0"),
        ({"max_error": "0.1"}, TypeError, "max_error"),
        ({"speedup": "2"}, TypeError, "speedup"),
        ({"metric": "bleu"}, ValueError, "metric"),
        ({"scope": "layer"}, ValueError, "scope"),
    ],
)
def test_field_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Budget(**kwargs)


def test_metric_defaults():
    assert Budget(metric="perplexity").tolerance == 0.015
    assert Budget(metric="cosine").tolerance < Budget().tolerance
    assert Budget(max_error=0.0).exact
