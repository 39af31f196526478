"""Mask classification by allowed pattern, whatever way a model built the mask."""

import pytest
import torch

from attnopt.patterns.masks import additive_to_allowed, causal_allowed, classify_allowed, window_allowed


@pytest.mark.parametrize("nq,nk", [(8, 8), (3, 8), (1, 5)])
def test_causal_is_bottom_right_aligned(nq, nk):
    a = causal_allowed(nq, nk)
    for i in range(nq):
        assert a[i].sum() == i + 1 + (nk - nq)


def test_triu_masked_fill_and_tril_buffers_are_causal():
    n = 12
    from_triu = ~torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    from_tril = torch.tril(torch.ones(1, 1, n, n)).bool()
    additive = torch.zeros(n, n).masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    finfo_min = torch.zeros(n, n).masked_fill(~from_triu, torch.finfo(torch.float32).min)
    for m in (from_triu, from_tril, additive_to_allowed(additive), additive_to_allowed(finfo_min)):
        assert classify_allowed(m) == ("causal", None)


def test_all_true_is_none_and_window_is_found():
    assert classify_allowed(torch.ones(1, 1, 6, 6, dtype=torch.bool)) == ("none", None)
    assert classify_allowed(window_allowed(16, 16, 5)) == ("sliding_window", 5)


def test_padding_with_and_without_causal():
    keys = torch.tensor([[1] * 6 + [0] * 2, [1] * 8], dtype=torch.bool)
    pad = keys[:, None, None, :].expand(2, 1, 8, 8)
    assert classify_allowed(pad)[0] == "padding"
    assert classify_allowed(pad & causal_allowed(8, 8))[0] == "padding"


def test_random_mask_is_tensor_and_bias_is_not_a_mask():
    torch.manual_seed(0)
    m = torch.rand(1, 1, 8, 8) > 0.5
    m[..., 0] = True
    assert classify_allowed(m)[0] == "tensor"
    assert additive_to_allowed(torch.randn(4, 4)) is None  # ALiBi-like bias


def test_bad_rank_names_the_shape():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        classify_allowed(torch.ones(3, dtype=torch.bool))


def test_as_additive_and_merge_allowed_keep_the_mask_form():
    """One mask algebra: bool masks stay bool when merged, additive ones get -inf; as_additive inverts."""
    from attnopt.patterns.masks import additive_to_allowed, as_additive, merge_allowed

    allowed = torch.tensor([[True, False], [True, True]])
    additive = torch.tensor([[0.0, -1e9], [0.0, 0.0]])
    causal = torch.tensor([[True, False], [True, True]])
    assert merge_allowed(None, causal) is causal and merge_allowed(allowed, None) is allowed
    assert torch.equal(merge_allowed(torch.ones(2, 2, dtype=torch.bool), causal), causal)
    merged = merge_allowed(torch.zeros(2, 2), causal)
    assert merged.dtype == torch.float32 and merged[0, 1] == float("-inf") and merged[1].eq(0).all()
    assert torch.equal(additive_to_allowed(as_additive(allowed)), allowed)
    assert torch.equal(additive_to_allowed(additive), allowed)
    assert as_additive(None) is None and as_additive(additive, torch.float16).dtype == torch.float16
    assert merge_allowed(None, None) is None
