"""BlockLayout: the block-sparse data format (round trips, constructors, FlexAttention agreement)."""

import pytest
import torch

from attnopt.replacements.block_layout import BlockLayout, ElementRule, indices_from_selection


def _brute_rule(q_len, kv_len, windows, sink, heads):
    out = torch.zeros(1, heads, q_len, kv_len, dtype=torch.bool)
    for h in range(heads):
        w = windows[h] if len(windows) > 1 else windows[0]
        for i in range(q_len):
            p = i + kv_len - q_len
            for j in range(kv_len):
                out[0, h, i, j] = j <= p and (j > p - w or j < sink)
    return out


@pytest.mark.parametrize(
    "shape,blocks", [((2, 3, 50, 70), (16, 16)), ((1, 2, 33, 33), (8, 16)), ((1, 1, 64, 64), (64, 64))]
)
def test_from_dense_round_trip(shape, blocks):
    for density in (0.05, 0.5, 0.95):
        allowed = torch.rand(shape) < density
        allowed[..., :5, :] = True  # some full blocks
        layout = BlockLayout.from_dense(allowed, q_block=blocks[0], kv_block=blocks[1])
        assert torch.equal(layout.to_dense(), allowed)
        assert (layout.kv_num_blocks >= 0).all() and layout.kv_indices.dtype == torch.int32


@pytest.mark.parametrize(
    "q_len,kv_len,sink,windows,blk",
    [
        (100, 100, 4, (17,), 16),
        (64, 150, 0, (5, 40), 32),
        (97, 97, 3, (1, 8, 100), 8),
        (30, 30, 30, (4,), 16),
    ],
)
def test_from_sink_window_matches_rule(q_len, kv_len, sink, windows, blk):
    heads = len(windows)
    layout = BlockLayout.from_sink_window(q_len, kv_len, sink, list(windows), q_block=blk, kv_block=blk)
    expected = _brute_rule(q_len, kv_len, windows, sink, heads)
    assert torch.equal(layout.to_dense()[0], expected[0].expand(layout.to_dense().shape[1:]))
    # Full blocks really are full: the kernel computes them without the rule.
    bm = layout.block_map()
    for h in range(bm.shape[1]):
        for m, n in (bm[0, h] == 2).nonzero().tolist():
            block = expected[0, min(h, heads - 1), m * blk : (m + 1) * blk, n * blk : (n + 1) * blk]
            assert block.all()
        for m, n in (bm[0, h] == 0).nonzero().tolist():
            block = expected[0, min(h, heads - 1), m * blk : (m + 1) * blk, n * blk : (n + 1) * blk]
            assert not block.any()


def test_density_sparsity_repr_and_picture():
    layout = BlockLayout.from_sink_window(512, 512, sink=4, window=128, q_block=128, kv_block=128)
    assert layout.density() == pytest.approx(9 / 16)
    assert layout.sparsity() == pytest.approx(7 / 16)
    text = layout.to_string()
    assert "density=0.562" in text and "░" in text
    assert "BlockLayout(shape=(1, 1, 512, 512)" in repr(layout)


def test_indices_valid_first_ascending():
    sel = torch.rand(3, 4, 10, 12) < 0.4
    num, idx = indices_from_selection(sel)
    for row_sel, n, row in zip(sel.reshape(-1, 12), num.flatten(), idx.reshape(-1, 12)):
        kept = row[: int(n)].tolist()
        assert kept == sorted(kept) and kept == row_sel.nonzero().flatten().tolist()


@pytest.mark.parametrize("causal", [True, False])
def test_from_block_scores_keeps_sinks_local_and_causality(causal):
    scores = torch.randn(2, 3, 8, 8)
    layout = BlockLayout.from_block_scores(
        scores, 120, 120, q_block=16, kv_block=16, causal=causal, topk=2, sink_blocks=1, local_blocks=1
    )
    bm = layout.block_map()
    assert (bm[..., 0] > 0).all()  # sink block
    diag = torch.arange(8)
    assert (bm[..., diag, diag] > 0).all()  # local block
    if causal:
        above = torch.triu(torch.ones(8, 8, dtype=torch.bool), 1)
        assert (bm[..., above] == 0).all()
        assert (bm[..., diag, diag] == 1).all()  # the diagonal needs the element rule
        dense = layout.to_dense()
        assert not (dense & ~ElementRule(causal=True).allowed(120, 120)).any()
    assert ((bm > 0).sum(-1) <= 4).all()


def test_from_block_scores_mass():
    scores = torch.tensor([[[[10.0, 0.0, 0.0, 9.0]] * 4]])
    layout = BlockLayout.from_block_scores(scores, 64, 64, q_block=16, kv_block=16, causal=False, mass=0.6,
                                           sink_blocks=0, local_blocks=0)  # fmt: skip
    assert (layout.block_map()[0, 0] > 0).tolist()[0] == [True, False, False, False]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="window >= 1"):
        BlockLayout.from_sink_window(10, 10, 0, 0)
    with pytest.raises(TypeError, match="bool"):
        BlockLayout.from_dense(torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="exactly one of topk or mass"):
        BlockLayout.from_block_scores(torch.zeros(1, 1, 2, 2), 4, 4, q_block=2, kv_block=2, causal=True)


def test_to_flex_block_mask_agrees_with_to_dense():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    for layout in (
        BlockLayout.from_sink_window(256, 256, sink=4, window=[40, 100], q_block=128, kv_block=128),
        BlockLayout.from_dense(torch.rand(1, 2, 256, 256) < 0.3, q_block=128, kv_block=128),
    ):
        bmask = layout.to_flex_block_mask()
        assert torch.equal(bmask.to_dense().bool(), (layout.block_map() > 0))
        elem = flex.create_mask(bmask.mask_mod, 1, 2, 256, 256, device="cpu")
        blocks = (layout.block_map() > 0).repeat_interleave(128, -2).repeat_interleave(128, -1)
        full = (layout.block_map() == 2).repeat_interleave(128, -2).repeat_interleave(128, -1)
        assert torch.equal(
            (blocks & (elem | full)).expand(1, 2, 256, 256), layout.to_dense().expand(1, 2, 256, 256)
        )
