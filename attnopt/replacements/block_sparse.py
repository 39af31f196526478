"""The block-sparse family: compute only the (query, key) blocks that carry the attention mass.

Three modes, one config (:class:`BlockSparseConfig`), one layout format (:class:`BlockLayout`):

* ``"static"`` — attention sinks + a sliding window per head (StreamingLLM / DuoAttention / MoA).
  Query ``p`` (bottom-right aligned) sees keys ``j <= p`` with ``j > p - w_h(N)`` or ``j < sink``.
  The window of head ``h`` is fitted at the calibration length ``N_cal`` as the smallest one
  whose distance mass plus the sink mass reaches ``target_mass``, and at key length ``N`` is
  ``w_h(N) = clamp(round(w_h * (N / N_cal) ** length_exponent), min_window, N)``. The default
  exponent 0 keeps windows absolute (calibration measures mass by *token distance*, which is
  what a local head keeps at any length); 1 scales them with N (MoA's "spans grow with
  length"), 0.5 in between. Causal self-attention only: a non-causal or cross-attention site
  has no diagonal for a window to follow.
* ``"dynamic"`` — query-aware block selection (MInference block-sparse, SpargeAttn stage 1):
  query and key blocks of ``block`` tokens are mean-pooled, block scores are
  ``scale * mean(q) @ mean(k)^T``; each query block keeps its top ``ceil(density * reachable)``
  key blocks (``density > 0``) or the fewest whose softmax mass over block scores reaches
  ``mass`` (``mass > 0``), plus the first ``sink_blocks`` and the ``local_blocks`` ending at the
  diagonal. Works causal or not, self or cross.
* ``"skip"`` — BLASST skip-softmax. Key blocks of ``block`` tokens are visited in ascending
  order for each query block (tile of ``block`` rows). For row ``r`` let ``m_loc[r, j]`` be the
  row max of the scaled, masked scores in key block ``j`` and ``m_run[r, j] = max_{j' < j}
  m_loc[r, j']`` (``-inf`` for the first block) — the running max a flash loop holds when it
  reaches block ``j`` (a skipped block cannot raise it, so skipping does not change it).
  Block ``j`` is skipped for the tile iff ``m_loc[r, j] - m_run[r, j] < log_lambda(N)`` for every
  row ``r`` of the tile; a skipped block adds nothing to numerator or denominator.
  ``log_lambda(N) = skip_log_threshold + ln(N_cal / N)`` (BLASST's threshold scaled as 1/N).

``reference`` builds the dense allowed map of the mode and calls
:func:`attnopt.replacements.exact.attention_reference`; the CPU kernel lives in
:mod:`attnopt.codegen.cpu.block_sparse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import sympy
import torch

from attnopt.patterns.masks import merge_allowed
from attnopt.replacements.base import SYMBOLS, Candidate, CostFormula, Family, FamilyConfig, register_family
from attnopt.replacements.block_layout import BlockLayout, ElementRule
from attnopt.replacements.exact import attention_reference, dense_cost

__all__ = [
    "BlockSparseConfig",
    "BlockSparseFamily",
    "MODES",
    "dynamic_layout",
    "fit_windows",
    "layout_for",
    "skip_layout",
    "static_windows",
]

MODES = ("static", "dynamic", "skip")


@dataclass(frozen=True)
class BlockSparseConfig(FamilyConfig):
    """Settings of one block-sparse candidate (see the module docstring for each mode's semantics).

    Attributes:
        mode: ``"static"``, ``"dynamic"`` or ``"skip"``.
        sink: static: leading keys every query sees.
        windows: static: per-query-head windows at ``calib_len`` (length 1 broadcasts).
        min_window: static: smallest window at any length.
        length_exponent: static: how windows scale with key length (0 absolute, 1 proportional).
        site_window: the site's own sliding window (0 = none); static windows never exceed it.
        calib_len: key length the windows / threshold were fitted at.
        block: dynamic/skip: query and key block size.
        density: dynamic: share of reachable key blocks kept per query block (top-k), or 0.
        mass: dynamic: cumulative block-score mass to keep, or 0.
        sink_blocks, local_blocks: dynamic: blocks always kept at the start and at the diagonal.
        skip_log_threshold: skip: ``ln(lambda)`` at ``calib_len``.
    """

    VERSION: ClassVar[int] = 1
    family: ClassVar[str] = "block_sparse"

    mode: str = "static"
    sink: int = 4
    windows: tuple[int, ...] = (512,)
    min_window: int = 64
    length_exponent: float = 0.0
    site_window: int = 0
    calib_len: int = 4096
    block: int = 64
    density: float = 0.0
    mass: float = 0.0
    sink_blocks: int = 1
    local_blocks: int = 1
    skip_log_threshold: float = -10.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}, but got mode={self.mode!r}.")
        if self.mode == "dynamic" and (self.density > 0) == (self.mass > 0):
            raise ValueError(
                f"Expected exactly one of density or mass > 0 in dynamic mode, but got density={self.density}, "
                f"mass={self.mass}. Set one of them to 0."
            )
        if self.block < 1 or self.calib_len < 1:
            raise ValueError(
                f"Expected block >= 1 and calib_len >= 1, but got {self.block}, {self.calib_len}."
            )

    def describe(self) -> str:
        if self.mode == "static":
            w = self.windows
            ws = str(w[0]) if len(set(w)) == 1 else f"{min(w)}..{max(w)}"
            return f"static sink={self.sink} window={ws}@{self.calib_len}"
        if self.mode == "dynamic":
            sel = f"top{self.density:.0%}" if self.density else f"mass{self.mass:g}"
            return f"dynamic block={self.block} {sel}"
        return f"skip block={self.block} lnλ={self.skip_log_threshold:g}@{self.calib_len}"


# -- static ---------------------------------------------------------------------------------


def static_windows(config: BlockSparseConfig, kv_len: int, num_heads: int) -> list[int]:
    """Per-head windows at key length ``kv_len`` (the length rule of the module docstring)."""
    ws = config.windows if len(config.windows) > 1 else config.windows * num_heads
    if len(ws) != num_heads:
        raise ValueError(
            f"Expected {num_heads} windows (one per query head), but got {len(ws)}. Refit the site."
        )
    ratio = (kv_len / config.calib_len) ** config.length_exponent
    out = []
    for w in ws:
        w = max(config.min_window, round(w * ratio))
        if config.site_window:
            w = min(w, config.site_window)
        out.append(max(1, min(w, kv_len)))
    return out


def fit_windows(distance_mass: torch.Tensor, sink_mass: torch.Tensor | None, target: float, *,
                min_window: int = 1) -> list[int]:  # fmt: skip
    """Smallest window per head keeping ``target`` of the attention mass (sink mass counted as kept).

    ``distance_mass`` is ``(H, bins)`` with bin ``b`` covering distances ``[2**b - 1, 2**(b+1) - 1)``
    (see :class:`attnopt.calibration.stats.SiteStats`); rows are normalised to sum 1 and the
    window is interpolated linearly inside the bin where the cumulative mass crosses
    ``target - sink_mass``. A window of ``w`` keys covers distances ``0 .. w-1``.
    """
    dm = distance_mass.float().clamp_min(0)
    dm = dm / dm.sum(-1, keepdim=True).clamp_min(1e-12)
    sink = torch.zeros(dm.shape[0]) if sink_mass is None else sink_mass.float().clamp(0, 1)
    out = []
    for h in range(dm.shape[0]):
        need = max(0.0, target - float(sink[h]))
        cum = 0.0
        window = 2 ** dm.shape[1] - 1
        for b in range(dm.shape[1]):
            m = float(dm[h, b])
            if cum + m >= need - 1e-9:
                lo, hi = 2**b - 1, 2 ** (b + 1) - 1
                frac = 0.0 if m <= 0 else (need - cum) / m
                window = math.ceil(lo + max(0.0, min(1.0, frac)) * (hi - lo))
                break
            cum += m
        out.append(max(min_window, window, 1))
    return out


def _distance_mass_from_samples(stats, bins: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance and sink mass of the kept q/k samples (causal), when calibration did not record them."""
    dist = torch.zeros(stats.q[0].shape[1], bins)
    sink = torch.zeros(stats.q[0].shape[1])
    for q, k, _, _ in list(stats.samples())[:2]:
        q = q[..., -256:, :]  # the last queries see the most history
        nq, nk = q.shape[-2], k.shape[-2]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ k.transpose(-1, -2)) * stats.scale
        p = torch.arange(nq)[:, None] + nk - nq
        j = torch.arange(nk)[None, :]
        probs = torch.softmax(s.masked_fill(j > p, float("-inf")), -1)[0]
        d = (p - j).clamp_min(0)
        b = torch.floor(torch.log2(d.float() + 1)).long().clamp(max=bins - 1)
        dist += (
            torch.zeros(probs.shape[0], bins).index_add_(1, b.flatten(), probs.reshape(probs.shape[0], -1))
            / nq
        )
        sink += probs[..., :4].sum(-1).mean(-1)
    n = max(1, min(2, len(stats.q)))
    return dist / n, sink / n


# -- dynamic / skip layouts ----------------------------------------------------------------


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` rows (the ragged last block averages its real rows)."""
    n = x.shape[-2]
    m = -(-n // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, m * block - n))
    counts = torch.clamp(n - torch.arange(m, device=x.device) * block, max=block).to(torch.float32)
    return padded.view(*x.shape[:-2], m, block, x.shape[-1]).sum(-2) / counts[:, None]


def dynamic_layout(q: torch.Tensor, k: torch.Tensor, config: BlockSparseConfig, *, scale: float,
                   causal: bool) -> BlockLayout:  # fmt: skip
    """The query-aware layout of ``"dynamic"`` mode for these inputs."""
    nq, nk, blk = q.shape[-2], k.shape[-2], config.block
    pq = _pool(q, blk)
    pk = _pool(k, blk).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (pq @ pk.transpose(-1, -2)) * scale
    topk = None
    if config.density > 0:
        mq, mk = scores.shape[-2:]
        if causal:
            pe = torch.clamp(torch.arange(1, mq + 1, device=scores.device) * blk, max=nq) - 1 + (nk - nq)
            reach = torch.clamp(pe // blk + 1, min=0, max=mk)
        else:
            reach = torch.full((mq,), mk, device=scores.device)
        topk = torch.ceil(reach.float() * config.density).long().clamp_min(1)
    return BlockLayout.from_block_scores(
        scores, nq, nk, q_block=blk, kv_block=blk, causal=causal, topk=topk,
        mass=config.mass if config.mass > 0 else None, sink_blocks=config.sink_blocks,
        local_blocks=config.local_blocks,
    )  # fmt: skip


def skip_log_lambda(config: BlockSparseConfig, kv_len: int) -> float:
    """``ln(lambda)`` at key length ``kv_len``: the calibrated threshold scaled as ``1/N``."""
    return config.skip_log_threshold + math.log(config.calib_len / kv_len)


def skip_layout(q: torch.Tensor, k: torch.Tensor, config: BlockSparseConfig, *, scale: float, causal: bool,
                attn_mask: torch.Tensor | None = None) -> BlockLayout:  # fmt: skip
    """The blocks BLASST's skip rule keeps for these inputs (exact scores, ascending block order)."""
    b, hq, nq, _ = q.shape
    nk, blk = k.shape[-2], config.block
    mq, mk = -(-nq // blk), -(-nk // blk)
    thr = skip_log_lambda(config, nk)
    kk = k.repeat_interleave(hq // k.shape[1], dim=1)
    keep = torch.zeros(b, hq, mq, mk, dtype=torch.bool, device=q.device)
    allowed = ElementRule(causal=causal).allowed(nq, nk).to(q.device) if causal else None
    for h in range(hq):
        s = (q[:, h].float() @ kk[:, h].float().transpose(-1, -2)) * scale  # (B, Nq, Nk)
        if allowed is not None:
            s = s.masked_fill(~allowed[0, 0], float("-inf"))
        if attn_mask is not None:
            m = attn_mask.expand(b, hq, nq, nk)[:, h]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        s = torch.nn.functional.pad(s, (0, mk * blk - nk), value=float("-inf"))
        m_loc = s.view(b, nq, mk, blk).amax(-1)  # (B, Nq, Mk)
        m_run = torch.cummax(m_loc, dim=-1).values
        m_run = torch.cat([torch.full_like(m_run[..., :1], float("-inf")), m_run[..., :-1]], dim=-1)
        diff = torch.where(torch.isinf(m_run) & ~torch.isinf(m_loc), torch.inf, m_loc - m_run).nan_to_num(
            nan=-torch.inf
        )
        diff = torch.nn.functional.pad(diff, (0, 0, 0, mq * blk - nq), value=float("-inf"))
        keep[:, h] = diff.view(b, mq, blk, mk).amax(-2) >= thr
    bm = torch.where(keep, 1, 0).to(torch.int8)
    return BlockLayout.from_block_map(bm, nq, nk, blk, blk, ElementRule(causal=causal))


def layout_for(q, k, config: BlockSparseConfig, *, scale: float, causal: bool, attn_mask=None,
               window: int | None = None) -> BlockLayout:  # fmt: skip
    """The layout ``config`` gives for these inputs (any mode)."""
    nq, nk = q.shape[-2], k.shape[-2]
    if config.mode == "static":
        ws = static_windows(config, nk, q.shape[1])
        if window:
            ws = [min(w, window) for w in ws]
        return BlockLayout.from_sink_window(
            nq, nk, config.sink, ws, q_block=config.block, kv_block=config.block
        )
    if config.mode == "dynamic":
        return dynamic_layout(q, k, config, scale=scale, causal=causal)
    return skip_layout(q, k, config, scale=scale, causal=causal, attn_mask=attn_mask)


# -- the family ----------------------------------------------------------------------------


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


class BlockSparseFamily(Family):
    """Static sink+window, dynamic block selection and skip-softmax (see the module docstring)."""

    name = "block_sparse"
    config_type = BlockSparseConfig

    #: Attention mass the static windows keep.
    STATIC_TARGETS = (0.6, 0.75, 0.85, 0.9, 0.95, 0.99)
    #: Top-k densities (share of reachable key blocks) and cumulative-mass thresholds of dynamic mode.
    DYNAMIC_DENSITIES = (0.1, 0.25, 0.5)
    DYNAMIC_MASSES = (0.95,)
    #: Output errors the skip threshold is calibrated to, and the ln(lambda) grid searched.
    SKIP_TARGET_ERRORS = (0.005, 0.02)
    SKIP_GRID = (-0.5, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0)
    #: Longest calibration prefix used to fit the skip threshold (it needs dense references).
    SKIP_CALIB_TOKENS = 1024
    BLOCK = 64

    def unsupported_reason(self, site) -> str | None:
        reason = super().unsupported_reason(site)
        if reason:
            return reason
        if site.dropout > 0:
            return (
                f"site {site.name} applies attention dropout p={site.dropout}; block-sparse variants are "
                "inference-only. Put the model in eval() mode before optimizing."
            )
        return None

    def mode_unsupported_reason(self, site, mode: str) -> str | None:
        """``None`` if ``mode`` can serve ``site``, else why not (static needs causal self-attention)."""
        reason = self.unsupported_reason(site)
        if reason or mode != "static":
            return reason
        if site.cross or not site.causal:
            kind = "cross-attention" if site.cross else "non-causal"
            return (
                f"static sink+window needs a causal self-attention site, but site {site.name} is {kind} "
                "(a window follows the causal diagonal). Use mode='dynamic' or mode='skip' for this site."
            )
        return None

    # -- candidates ------------------------------------------------------------------------
    def candidates(self, site, stats) -> list[Candidate]:
        if self.unsupported_reason(site):
            return []
        calib_len = (
            stats.lengths[-1][1] if stats.lengths else (stats.k[0].shape[-2] if stats.k else site.kv_len)
        )
        out = []
        if self.mode_unsupported_reason(site, "static") is None:
            out += self._static_candidates(site, stats, calib_len)
        for d in self.DYNAMIC_DENSITIES:
            cfg = BlockSparseConfig(mode="dynamic", density=d, block=self.BLOCK, calib_len=calib_len)
            out.append(self._candidate(site, cfg, f"top {d:.0%} of reachable key blocks"))
        for m in self.DYNAMIC_MASSES:
            dens = self._measured_density(
                site, stats, BlockSparseConfig(mode="dynamic", mass=m, block=self.BLOCK)
            )
            cfg = BlockSparseConfig(mode="dynamic", mass=m, block=self.BLOCK, calib_len=calib_len)
            out.append(
                self._candidate(site, cfg, f"block-score mass {m:g}; density {dens:.3f} on calibration", dens)
            )
        out += self._skip_candidates(site, stats)
        return out

    def profile_key(self, config: FamilyConfig) -> str:
        """``block_sparse:<mode>``: the static band, dynamic selection and skip kernels differ."""
        return f"{self.name}:{config.mode}"

    def decode_form(self, config: FamilyConfig) -> bool:
        """Static sink+window heads decode over their sinks and window only (StreamingLLM's form);
        dynamic and skip selections are defined over query blocks, so their decode steps run exact."""
        return isinstance(config, BlockSparseConfig) and config.mode == "static"

    def _candidate(self, site, cfg: BlockSparseConfig, notes: str, density: float | None = None,
                   error: float | None = None) -> Candidate:  # fmt: skip
        return Candidate(site=site.name, family=self.name, config=cfg, cost=self.cost(site, cfg, density),
                         error=error, notes=notes)  # fmt: skip

    def _static_candidates(self, site, stats, calib_len: int) -> list[Candidate]:
        dm, sm = stats.distance_mass, stats.sink_mass
        if (dm is None or float(dm.abs().sum()) == 0) and stats.q:
            dm, sm = _distance_mass_from_samples(stats)
        if dm is None:
            return []
        seen, out = set(), []
        for target in self.STATIC_TARGETS:
            ws = fit_windows(dm, sm, target, min_window=BlockSparseConfig.min_window)
            ws = tuple(min(w, site.window) if site.window else w for w in ws)
            if ws in seen:
                continue
            seen.add(ws)
            cfg = BlockSparseConfig(
                mode="static", sink=4, windows=ws, site_window=site.window or 0, calib_len=calib_len
            )
            out.append(
                self._candidate(site, cfg, f"windows keep {target:.0%} of attention mass at N={calib_len}")
            )
        return out

    def _measured_density(self, site, stats, cfg: BlockSparseConfig) -> float:
        dens = [
            dynamic_layout(q, k, cfg, scale=stats.scale, causal=site.causal).density()
            for q, k, _, _ in stats.samples()
        ]
        return sum(dens) / len(dens) if dens else 0.5

    def _skip_candidates(self, site, stats) -> list[Candidate]:
        """Largest ln(lambda) on the grid whose output error stays under each target error."""
        samples = [(q[..., : self.SKIP_CALIB_TOKENS, :], k, v, m) for q, k, v, m in list(stats.samples())[:2]]
        if not samples:
            return []
        prepared = []  # (q, k, v, mask, exact output) per sample: the reference is computed once
        for q, k, v, m in samples:
            n = min(k.shape[-2], self.SKIP_CALIB_TOKENS)
            k, v = k[..., :n, :], v[..., :n, :]
            q = q[..., -min(q.shape[-2], n) :, :] if site.cross else q[..., :n, :]
            m = None if m is None else m[..., : q.shape[-2], :n]
            prepared.append((q, k, v, m, attention_reference(q, k, v, m, scale=stats.scale, causal=site.causal)))
        results = []  # (lnλ, error, density)
        for thr in self.SKIP_GRID:
            errs, dens = [], []
            for q, k, v, m, ref in prepared:
                n = k.shape[-2]
                cfg = BlockSparseConfig(mode="skip", block=self.BLOCK, skip_log_threshold=thr, calib_len=n)
                lay = skip_layout(q, k, cfg, scale=stats.scale, causal=site.causal, attn_mask=m)
                got = attention_reference(q, k, v, merge_allowed(m, lay.to_dense()), scale=stats.scale)
                errs.append(_rel_err(got, ref))
                dens.append(lay.density())
            results.append((thr, max(errs), sum(dens) / len(dens), n))
        out, seen = [], set()
        for target in self.SKIP_TARGET_ERRORS:
            ok = [r for r in results if r[1] <= target]
            if not ok:
                continue
            thr, err, dens, n = max(ok, key=lambda r: r[0])
            if thr in seen:
                continue
            seen.add(thr)
            cfg = BlockSparseConfig(mode="skip", block=self.BLOCK, skip_log_threshold=thr, calib_len=n)
            note = f"skip threshold for error <= {target:g}: error {err:.4f}, density {dens:.3f} at N={n}"
            out.append(self._candidate(site, cfg, note, dens, err))
        return out

    # -- semantics -------------------------------------------------------------------------
    def reference(self, q, k, v, candidate, *, scale, causal, attn_mask=None):
        cfg = candidate.config if isinstance(candidate, Candidate) else candidate
        if cfg.mode == "static" and not causal:
            raise ValueError(
                "Expected a causal call for static sink+window mode, but got causal=False. Use 'dynamic'."
            )
        layout = layout_for(q, k, cfg, scale=scale, causal=causal, attn_mask=attn_mask)
        return attention_reference(q, k, v, merge_allowed(attn_mask, layout.to_dense().to(q.device)), scale=scale)

    def cost(self, site, config: BlockSparseConfig, density: float | None = None) -> CostFormula:
        """Dense FLOPs/bytes scaled by the share of scores computed, as a formula of ``Nk`` (= ``Nq``)."""
        s = SYMBOLS
        causal_half = site.causal and not site.window
        if config.mode == "static":
            ratio = (s["Nk"] / config.calib_len) ** sympy.nsimplify(config.length_exponent)
            ws = [sympy.Min(sympy.Max(config.min_window, w * ratio), s["Nk"]) for w in config.windows]
            if config.site_window:
                ws = [sympy.Min(w, config.site_window) for w in ws]
            keys = sympy.Min(sum(ws) / len(ws) + config.sink, s["Nk"])
            share = keys / s["Nk"] * (2 if causal_half else 1)
            return dense_cost(site, density=share)
        if config.mode == "dynamic":
            share = sympy.Float(config.density if config.density > 0 else (density or 0.5))
            fixed = (config.sink_blocks + config.local_blocks) * config.block / s["Nk"]
            base = dense_cost(site, density=sympy.Min(1, share + fixed))
            pooled = 2 * s["B"] * s["H"] * s["Nq"] * s["Nk"] * s["D"] / config.block**2
            return CostFormula(flops=base.flops + pooled, bytes=base.bytes, scores=base.scores)
        # skip: every Q.K^T block is computed (its max decides), softmax and P.V only for kept ones.
        share = sympy.Float(density if density is not None else 0.5)
        scores = s["B"] * s["H"] * s["Nq"] * s["Nk"] / (2 if causal_half else 1)
        flops = scores * (2 * s["D"] + 1) + scores * share * (2 * s["Dv"] + 5)
        return CostFormula(flops=flops, bytes=dense_cost(site).bytes, scores=scores * share)


register_family(BlockSparseFamily())
