"""The block-sparse family: semantics, fitting, candidates, and the CPU kernel against the reference."""

import json

import pytest
import torch

import attnopt.codegen.cpu.block_sparse as cpu_bs
from attnopt.calibration.stats import SiteStats
from attnopt.codegen.ops import op_for
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import Candidate, get_family
from attnopt.replacements.block_layout import ElementRule
from attnopt.replacements.block_sparse import BlockSparseConfig, fit_windows, static_windows
from attnopt.replacements.exact import attention_reference

FAMILY = get_family("block_sparse")


def _site(causal=True, cross=False, heads=4, kv_heads=4, n=128, dropout=0.0):
    return AttentionSite(name="m.attn#0", module_path="m.attn", index=0, pattern="sdpa", num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=16, head_dim_v=16, q_len=n, kv_len=n, batch=1,
                         causal=causal, scale=0.25, cross=cross, dropout=dropout)  # fmt: skip


def _qkv(b, hq, hkv, nq, nk, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))  # fmt: skip


def _call_op(q, k, v, cfg, *, causal, attn_mask=None, scale=0.25):
    config = json.dumps({"site": "t", "family": "block_sparse", "config": cfg.to_json(), "mask_static": False,
                         "window": None})  # fmt: skip
    return op_for("block_sparse")(q, k, v, attn_mask, [], scale, causal, config)


def _err(a, b):
    return float((a - b).abs().max())


def test_config_json_round_trip_and_validation():
    cfg = BlockSparseConfig(mode="static", sink=2, windows=(32, 64), calib_len=256)
    assert BlockSparseConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="mode"):
        BlockSparseConfig(mode="banana")
    with pytest.raises(ValueError, match="exactly one of density or mass"):
        BlockSparseConfig(mode="dynamic")


@pytest.mark.parametrize("mode", ["static", "dynamic", "skip"])
def test_all_blocks_kept_equals_exact(mode):
    q, k, v = _qkv(2, 4, 2, 70, 70, dtype=torch.float64)
    cfg = {
        "static": BlockSparseConfig(mode="static", windows=(1000,), calib_len=70),
        "dynamic": BlockSparseConfig(mode="dynamic", density=1.0, block=16),
        "skip": BlockSparseConfig(mode="skip", block=16, skip_log_threshold=-1e9),
    }[mode]
    cand = Candidate(site="s", family="block_sparse", config=cfg)
    exact = attention_reference(q, k, v, scale=0.25, causal=True)
    assert _err(FAMILY.reference(q, k, v, cand, scale=0.25, causal=True), exact) < 1e-6
    assert _err(_call_op(q, k, v, cfg, causal=True), exact) < 1e-6


@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,windows,sink",
    [
        (1, 4, 4, 300, 300, (40,), 0),
        (2, 4, 2, 333, 333, (64,), 4),  # GQA, N not a multiple of the chunk
        (1, 4, 4, 150, 400, (16, 80, 200, 33), 2),  # Nq != Nk (bottom-right), per-head windows
        (1, 6, 2, 257, 257, (20, 20, 20, 50, 50, 7), 1),  # per-head windows splitting GQA groups
    ],
)
def test_static_kernel_matches_reference(b, hq, hkv, nq, nk, windows, sink):
    q, k, v = _qkv(b, hq, hkv, nq, nk)
    cfg = BlockSparseConfig(mode="static", sink=sink, windows=windows, min_window=1, calib_len=nk)
    ref = FAMILY.reference(q, k, v, cfg, scale=0.25, causal=True)
    assert _err(_call_op(q, k, v, cfg, causal=True), ref) < 2e-5
    # The reference really is sink + window: compare with the rule itself.
    allowed = ElementRule(causal=True, window=tuple(static_windows(cfg, nk, hq)), sink=sink).allowed(nq, nk)
    assert _err(ref, attention_reference(q, k, v, allowed, scale=0.25)) < 1e-5


@pytest.mark.parametrize("chunk", [16, 64])
def test_band_path_with_padding_mask(chunk):
    q, k, v = _qkv(2, 4, 2, 200, 200)
    pad = torch.ones(2, 1, 1, 200, dtype=torch.bool)
    pad[1, ..., :30] = False
    allowed = ElementRule(causal=True, window=(50,), sink=3).allowed(200, 200) & pad
    ref = attention_reference(q, k, v, allowed, scale=0.25)
    got = cpu_bs.band_attention(q, k, v, scale=0.25, window=50, sink=3, attn_mask=pad, chunk=chunk)
    assert _err(got, ref) < 2e-5
    additive = torch.zeros(2, 1, 1, 200).masked_fill(~pad, float("-inf"))
    assert (
        _err(
            cpu_bs.band_attention(q, k, v, scale=0.25, window=50, sink=3, attn_mask=additive, chunk=chunk),
            ref,
        )
        < 2e-5
    )


@pytest.mark.parametrize("causal,nq,nk,hkv", [(True, 200, 200, 4), (True, 90, 200, 2), (False, 130, 70, 1)])
@pytest.mark.parametrize("sel", [{"density": 0.3}, {"mass": 0.9}])
def test_dynamic_kernel_matches_reference(causal, nq, nk, hkv, sel):
    q, k, v = _qkv(2, 4, hkv, nq, nk)
    cfg = BlockSparseConfig(mode="dynamic", block=32, **sel)
    ref = FAMILY.reference(q, k, v, cfg, scale=0.25, causal=causal)
    assert _err(_call_op(q, k, v, cfg, causal=causal), ref) < 2e-5
    exact = attention_reference(q, k, v, scale=0.25, causal=causal)
    if "density" in sel:
        assert _err(ref, exact) > 1e-4  # it really is sparse


def test_dynamic_kernel_with_padding_mask():
    q, k, v = _qkv(2, 4, 4, 100, 100)
    pad = torch.ones(2, 1, 1, 100, dtype=torch.bool)
    pad[0, ..., 70:] = False
    cfg = BlockSparseConfig(mode="dynamic", block=16, density=0.5)
    ref = FAMILY.reference(q, k, v, cfg, scale=0.25, causal=True, attn_mask=pad)
    assert _err(_call_op(q, k, v, cfg, causal=True, attn_mask=pad), ref) < 2e-5


def test_skip_kernel_matches_reference_and_skips_more_with_higher_threshold():
    q, k, v = _qkv(1, 4, 2, 256, 256)
    q[:, :, :, 0] += 4.0  # make some keys dominate so skipping is possible
    k[:, :, 10:20, 0] += 6.0
    densities = []
    for thr in (-12.0, -2.0):
        cfg = BlockSparseConfig(mode="skip", block=32, skip_log_threshold=thr, calib_len=256)
        ref = FAMILY.reference(q, k, v, cfg, scale=0.25, causal=True)
        assert _err(_call_op(q, k, v, cfg, causal=True), ref) < 2e-5
        from attnopt.replacements.block_sparse import skip_layout

        densities.append(skip_layout(q, k, cfg, scale=0.25, causal=True).density())
    assert densities[1] < densities[0]


def test_fit_windows_local_head_gets_small_window():
    bins = 12
    local = torch.zeros(bins)
    local[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05])  # everything within 15 tokens
    diffuse = torch.ones(bins) / bins
    ws = fit_windows(torch.stack([local, diffuse]), torch.tensor([0.0, 0.0]), 0.95)
    assert ws[0] <= 16 and ws[1] > 1000
    # A big sink share lowers the window a head needs.
    assert fit_windows(diffuse[None], torch.tensor([0.5]), 0.95)[0] < ws[1]


def test_window_length_rule():
    cfg = BlockSparseConfig(
        mode="static", windows=(256, 64), min_window=32, calib_len=1024, length_exponent=0.5
    )
    assert static_windows(cfg, 4096, 2) == [512, 128]
    assert static_windows(cfg, 64, 2) == [64, 32]
    absolute = BlockSparseConfig(mode="static", windows=(256,), calib_len=1024)
    assert static_windows(absolute, 8192, 3) == [256, 256, 256]


def _stats(n=128, heads=4, kv_heads=4):
    q, k, v = _qkv(1, heads, kv_heads, n, n)
    dist = torch.zeros(heads, 8)
    dist[:, :3] = 0.3
    dist[0, :] = 1.0 / 8  # head 0 is diffuse
    return SiteStats(site="m.attn#0", q=[q], k=[k], v=[v], attn_mask=[None], scale=0.25, causal=True,
                     sink_mass=torch.full((heads,), 0.05), distance_mass=dist, lengths=[(n, n)])  # fmt: skip


def test_candidates_causal_site():
    site, stats = _site(), _stats()
    cands = FAMILY.candidates(site, stats)
    modes = {c.config.mode for c in cands}
    assert modes == {"static", "dynamic", "skip"}
    static = [c for c in cands if c.config.mode == "static"]
    assert static[-1].config.windows[0] > static[-1].config.windows[1]  # the diffuse head needs more
    shape = dict(B=1, H=4, Hkv=4, Nq=4096, Nk=4096, D=16, Dv=16, E=4)
    dense = get_family("exact").cost(site, None).evaluate(**shape)[0]
    for c in cands:
        flops, nbytes = c.cost.evaluate(**shape)
        assert 0 < flops and nbytes > 0
        assert c.config.mode == "skip" or flops < dense
        assert BlockSparseConfig.from_json(c.config.to_json()) == c.config
    for c in (c for c in cands if c.config.mode == "skip"):
        assert c.error is not None and c.error <= 0.02


def test_unsupported_sites_say_why():
    assert "dropout" in FAMILY.unsupported_reason(_site(dropout=0.1))
    assert FAMILY.candidates(_site(dropout=0.1), _stats()) == []
    reason = FAMILY.mode_unsupported_reason(_site(causal=False), "static")
    assert "causal self-attention" in reason and "dynamic" in reason
    assert "cross-attention" in FAMILY.mode_unsupported_reason(_site(cross=True), "static")
    cands = FAMILY.candidates(_site(causal=False), _stats())
    assert cands and all(c.config.mode != "static" for c in cands)
    q, k, v = _qkv(1, 2, 2, 32, 32)
    with pytest.raises(ValueError, match="causal"):
        _call_op(q, k, v, BlockSparseConfig(mode="static", windows=(8,)), causal=False)


@pytest.mark.parametrize("parallel", [True, False])
def test_item_pool_matches_and_restores_thread_count(parallel, monkeypatch):
    monkeypatch.setattr(cpu_bs, "PARALLEL_ITEMS", parallel)
    threads = torch.get_num_threads()
    q, k, v = _qkv(2, 4, 2, 300, 300)
    allowed = ElementRule(causal=True, window=(70,), sink=2).allowed(300, 300)
    ref = attention_reference(q, k, v, allowed, scale=0.25)
    assert _err(cpu_bs.band_attention(q, k, v, scale=0.25, window=70, sink=2, chunk=32), ref) < 2e-5
    cfg = BlockSparseConfig(mode="dynamic", block=32, density=0.4)
    assert (
        _err(_call_op(q, k, v, cfg, causal=True), FAMILY.reference(q, k, v, cfg, scale=0.25, causal=True))
        < 2e-5
    )
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_cpu_kernel_runs_under_the_callers_autograd_mode(mode):
    """Worker threads inherit inference_mode/no_grad (thread-local in torch)."""
    from attnopt.codegen.cpu.block_sparse import band_attention
    from attnopt.replacements.exact import attention_reference

    q, k, v = (torch.randn(1, 8, 512, 32) for _ in range(3))
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        out = band_attention(q, k, v, scale=32**-0.5, window=64)
    ref = attention_reference(q, k, v, scale=32**-0.5, causal=True, window=64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parallel,chunk", [(True, 16), (False, 16), (False, None)])
@pytest.mark.parametrize(
    "nq,nk,windows,sink,masked",
    [
        (300, 300, (70, 20, 70, 300), 2, False),  # head 1 alone, heads 0+2 share a window but not a kv head
        (300, 300, (33, 33, 128, 5), 0, True),  # padding mask; window 5 smaller than the chunk
        (97, 260, (64, 200, 64, 64), 3, False),  # queries at the end of a longer key sequence
        (40, 40, (1000, 7, 1000, 1000), 1, True),  # windows past the sequence: plain causal rows
    ],
)
def test_band_path_per_head_windows(nq, nk, windows, sink, masked, parallel, chunk, monkeypatch):
    """Different windows per head in one call match the rule; heads with equal windows share items."""
    monkeypatch.setattr(cpu_bs, "PARALLEL_ITEMS", parallel)
    q, k, v = _qkv(2, 4, 2, nq, nk)
    allowed = ElementRule(causal=True, window=windows, sink=sink).allowed(nq, nk)
    pad = None
    if masked:
        pad = torch.ones(2, 1, 1, nk, dtype=torch.bool)
        pad[1, ..., :11] = False
        allowed = allowed & pad
    ref = attention_reference(q, k, v, allowed, scale=0.25)
    poisoned = torch.full((2, 4, nq, 16), float("nan"))
    got = cpu_bs.band_attention(q, k, v, scale=0.25, window=list(windows), sink=sink, attn_mask=pad, chunk=chunk,
                                out=poisoned)  # fmt: skip
    # rows the padding mask empties entirely are 0 in the kernel, NaN in the reference
    assert _err(got, ref.nan_to_num(0.0)) < 2e-5


def test_band_path_rejects_a_window_list_of_the_wrong_length():
    q, k, v = _qkv(1, 4, 2, 64, 64)
    with pytest.raises(ValueError, match="one window per query head"):
        cpu_bs.band_attention(q, k, v, scale=0.25, window=[8, 8])
