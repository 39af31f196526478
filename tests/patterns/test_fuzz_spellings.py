"""Property tests: attention written every way the matchers claim is found exactly and rewritten
within FlashAttention's error rule; softmaxes that are not attention are never rewritten.

The generator is :mod:`tests.spellings`; ``benchmarks/fuzz_spellings.py`` runs the same properties
on many more examples and commits the counts. Draws are derandomised so CI is repeatable; a failure
prints the shrunk :class:`~tests.spellings.Spelling`, which reproduces it as a plain test.
"""

from __future__ import annotations

import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.spellings import NEGATIVES, check_found, check_negative, check_rewrite, spellings

_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=200, **_SETTINGS)
@given(spellings())
def test_generated_spellings_are_found_with_their_heads_mask_and_scale(spec):
    problem = check_found(spec)
    assert problem is None, f"{spec.describe()}: {problem}"


@settings(max_examples=60, **_SETTINGS)
@given(spellings())
def test_generated_spellings_rewrite_within_flash_attentions_error_rule(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = check_rewrite(spec)
    assert problem is None, f"{spec.describe()}: {problem}"


@settings(max_examples=60, **_SETTINGS)
@given(st.sampled_from(NEGATIVES), spellings())
def test_softmaxes_that_are_not_attention_are_never_rewritten(kind, spec):
    problem = check_negative(kind, spec)
    assert problem is None, f"{kind} at {spec.describe()}: {problem}"
