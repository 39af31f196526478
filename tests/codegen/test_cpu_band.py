"""The CPU band engine (``attnopt.codegen.cpu.band``) against ``attention_reference``.

One implementation serves the block_sparse static band, the shared family's scores and the
hybrid linear window, so it is checked here on its own: windows (one and per head), plain
causal and non-causal rows, sinks, GQA, queries at the end of a longer key sequence, padding
masks (bool and additive), the unnormalised output, and tiny tiles that split every path.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.codegen.cpu import band
from attnopt.codegen.cpu.pool import MAX_TILE
from attnopt.replacements.block_layout import ElementRule
from attnopt.replacements.exact import attention_reference

SCALE = 0.3


def _qkv(b, hq, hkv, nq, nk, d=16, dv=16, dtype=torch.float64):
    return (
        torch.randn(b, hq, nq, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
        torch.randn(b, hkv, nk, dv, dtype=dtype),
    )


def _padding(b, nk, kind):
    keep = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    keep[-1, ..., : nk // 5] = False  # the last sequence hides its first keys
    if kind == "additive":
        return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    return keep


def _reference(q, k, v, *, causal, window, mask):
    """The ground truth (its softmax runs in float32, hence the 1e-6 tolerances below)."""
    return attention_reference(q, k, v, mask, scale=SCALE, causal=causal, window=window).nan_to_num(0.0)


CASES = [
    # b, hq, hkv, nq, nk, causal, window
    (2, 4, 2, 150, 150, True, 40),  # GQA, interior chunks plus ragged tail
    (1, 4, 1, 70, 200, True, 33),  # queries at the end of a longer key sequence
    (1, 2, 2, 90, 40, True, 12),  # more queries than keys: the first rows see nothing
    (2, 4, 2, 60, 60, True, 500),  # window past the sequence: plain causal
    (2, 4, 2, 80, 80, True, None),  # causal, no window
    (1, 6, 3, 37, 90, True, None),
    (2, 4, 4, 50, 70, False, None),  # non-causal: every key
]


@pytest.mark.parametrize("max_tile", [MAX_TILE, 1])  # 1: 16-row edge tiles, one chunk per matmul
@pytest.mark.parametrize("chunk", [None, 1, 16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, mask_kind, chunk, max_tile):
    b, hq, hkv, nq, nk, causal, window = case
    q, k, v = _qkv(b, hq, hkv, nq, nk)
    mask = None if mask_kind is None else _padding(b, nk, mask_kind)
    poisoned = torch.full((b, hq, nq, v.shape[-1]), float("nan"), dtype=q.dtype)
    got = band.band_attention(
        q, k, v, scale=SCALE, window=window, causal=causal, attn_mask=mask, chunk=chunk, max_tile=max_tile,
        out=poisoned,
    )  # fmt: skip
    ref = _reference(q, k, v, causal=causal, window=window, mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("nq,nk", [(120, 120), (50, 130)])
def test_per_head_windows_and_sinks_match_the_element_rule(nq, nk, chunk):
    q, k, v = _qkv(2, 4, 2, nq, nk)
    windows, sink = (9, 60, 9, 200), 3
    allowed = ElementRule(causal=True, window=windows, sink=sink).allowed(nq, nk) & _padding(2, nk, "bool")
    got = band.band_attention(
        q, k, v, scale=SCALE, window=list(windows), sink=sink, attn_mask=_padding(2, nk, "bool"), chunk=chunk
    )
    ref = attention_reference(q, k, v, allowed, scale=SCALE).nan_to_num(0.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [7, 40, None])
def test_unnormalised_output_carries_its_normaliser(window):
    """With a ones column on v, ``normalize=False`` gives ``[Σ w v, Σ w]`` with ``w = exp(s - rowmax)``."""
    q, k, v = _qkv(2, 4, 2, 64, 64, dv=8)
    mask = _padding(2, 64, "bool")
    v1 = torch.cat([v, torch.ones(*v.shape[:-1], 1, dtype=v.dtype)], dim=-1)
    acc = band.band_attention(q, k, v1, scale=SCALE, window=window, attn_mask=mask, chunk=16, normalize=False)
    num, den = acc[..., :8], acc[..., 8:]
    seen = den[..., 0] > 0
    assert bool((den[seen] >= 1 - 1e-9).all())  # the row max contributes exp(0) = 1
    ref = _reference(q, k, v, causal=True, window=window, mask=mask)
    torch.testing.assert_close(torch.where(den > 0, num / den, 0.0), ref, rtol=1e-5, atol=1e-6)


def test_float32_and_rows_without_keys():
    q, k, v = _qkv(1, 2, 1, 40, 40, dtype=torch.float32)
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    mask[..., 30:, :] = False  # the last rows see nothing at all
    got = band.band_attention(q, k, v, scale=SCALE, window=10, attn_mask=mask, chunk=8)
    assert not got.isnan().any() and got[..., 30:, :].abs().max() == 0
    ref = _reference(q.double(), k.double(), v.double(), causal=True, window=10, mask=mask)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_visible_keys_and_edge_masks_are_the_window_rule():
    nq, nk, window, sink = 30, 50, 8, 2
    offset = nk - nq
    allowed = ElementRule(causal=True, window=(window,), sink=sink).allowed(nq, nk)[0, 0]
    for start, stop in ((0, 7), (7, 20), (20, 30)):
        lo, hi = band.visible_keys(start, stop, offset, nk, causal=True, window=window)
        rows = allowed[start:stop]
        assert not rows[:, hi:].any() and not rows[:, sink:lo].any()  # nothing outside [lo, hi) but sinks
        scores = torch.zeros(stop - start, hi - lo)
        band.mask_band_edges(scores, start, stop, lo, hi, offset, window, sink)
        assert torch.equal(scores == 0, rows[:, lo:hi])
    assert band.visible_keys(0, 5, -10, 20, causal=True, window=None) == (0, 0)  # rows before key 0
    assert band.visible_keys(0, 5, 0, 20, causal=False, window=None) == (0, 20)


def test_rejects_bad_arguments():
    q, k, v = _qkv(1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="one window per query head"):
        band.band_attention(q, k, v, scale=SCALE, window=[4, 4])
    with pytest.raises(ValueError, match="windows >= 1"):
        band.band_attention(q, k, v, scale=SCALE, window=0)
    with pytest.raises(ValueError, match="sink"):
        band.band_attention(q, k, v, scale=SCALE, window=None, sink=2)
    with pytest.raises(ValueError, match="divisible"):
        band.band_attention(q[:, :3], k, v, scale=SCALE, window=4)
