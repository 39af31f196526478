"""Property tests: attention written every way the matchers claim is found exactly and rewritten
within FlashAttention's error rule; softmaxes that are not attention are never rewritten.

The generator is :mod:`tests.spellings`; ``benchmarks/fuzz_spellings.py`` runs the same properties
on many more examples and commits the counts. Draws are derandomised so CI is repeatable; a failure
prints the shrunk :class:`~tests.spellings.Spelling`, which reproduces it as a plain test.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.spellings import NEGATIVES, Spelling, check_found, check_negative, check_rewrite, spellings

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


# -- the bugs the generator found, pinned as plain tests ---------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        # key padding that happens to fit under the causal triangle was reported causal
        Spelling(mask="pad_where", cross=True, q_len=5, kv_len=7),
        Spelling(mask="pad_additive", q_len=5, kv_len=5),
        # GQA under layouts other than (B, H, N, D) @: einsum, (B*H, N, D) bmm, and flatten
        Spelling(layout="bnhd_einsum", heads=4, kv_heads=2),
        Spelling(layout="bh_bmm", heads=6, kv_heads=3, gqa="repeat_interleave"),
        Spelling(layout="bh_baddbmm", scale="alpha", heads=4, kv_heads=1, gqa="expand_flatten"),
        # K pre-scaled before it is repeated for GQA; einsum with a pre-scaled K
        Spelling(scale="pre_k", heads=4, kv_heads=2),
        Spelling(layout="bnhd_einsum", scale="pre_k"),
    ],
    ids=lambda s: s.describe(),
)
def test_spellings_the_generator_once_broke_are_found(spec):
    assert check_found(spec) is None


def test_a_product_of_the_probabilities_with_themselves_is_not_attention():
    assert check_negative("p_times_p", Spelling(q_len=8, head_dim=8)) is None
