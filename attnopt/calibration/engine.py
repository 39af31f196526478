"""Run calibration batches through the model and record, per site, what the families need.

The model runs with every site rewritten to the exact operator; an observer hooked into the
operator sees each site's resolved inputs (q, k, v in ``(B, H, N, D)``, the reduced mask,
scale, causal/window) exactly as variants will.

Memory is bounded independently of how many calibration calls there are. With ``S`` =
``max_sequences``, ``T`` = ``min(N, max_tokens)``, query heads ``H``, KV heads ``Hkv``, head dims
``D``/``Dv``, what calibration keeps per site is at most

    S * T * (H*D + Hkv*(D + Dv)) * 4 bytes        (q/k/v samples, float32)
  + S * T * T bytes (bool) or * 4 (additive)      (only if the model passes a mask that is not
                                                   plain causal/window/none)
  + (H*H + H*(distance_bins + 2)) * 4 bytes       (running statistics)
  + MAX_LENGTHS (q_len, kv_len) pairs            (attnopt.patterns.site_stats)

and the transient workspace of one call is one batch row of q/k in float32 plus
:data:`STATS_CHUNK_ELEMENTS` attention probabilities (16 MiB) and their normalised copy. The
held-out check keeps the judged part of at most ``REFERENCE_BYTES`` of exact outputs
(:mod:`attnopt.pipeline.validation`). At codelm's shape (H=4, Hkv=2, D=Dv=64, N=2048, 4
layers, S=4) the samples are 4 * 2048 * 512 * 4 bytes = 16 MiB per site, 64 MiB for the model,
whether 4 or 400 calls calibrate. ``benchmarks/memory.py`` measures the peak.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping

import torch

from attnopt.calibration.stats import CalibrationConfig, SiteStats
from attnopt.codegen.ops import AttentionCall, DispatchHook, dispatch_hook
from attnopt.patterns.masks import causal_allowed, window_allowed

__all__ = ["calibrate", "observe", "StatsAccumulator"]

log = logging.getLogger("attnopt.calibration")

#: Largest ``(H, rows, Nk)`` block of attention probabilities formed at once for statistics
#: (4M elements = 16 MiB in float32); query rows are processed in chunks that fit.
STATS_CHUNK_ELEMENTS = 1 << 22


class StatsAccumulator:
    """Running per-site statistics (means weighted by sampled query rows)."""

    def __init__(self, site: str, config: CalibrationConfig) -> None:
        self.stats = SiteStats(site=site)
        self.cfg = config
        self._rows = 0
        self._gen = torch.Generator().manual_seed(config.seed)

    def add(self, call: AttentionCall) -> None:
        st, cfg = self.stats, self.cfg
        q, k, v = call.q.detach(), call.k.detach(), call.v.detach()
        st.num_calls += 1
        st.record_length(q.shape[-2], k.shape[-2])
        st.scale, st.causal, st.window = call.scale, call.causal, call.window
        for b in range(q.shape[0]):
            if len(st.q) >= cfg.max_sequences:
                break
            n_q, n_k = min(q.shape[-2], cfg.max_tokens), min(k.shape[-2], cfg.max_tokens)
            # keep the *last* queries and the keys they see when truncating a causal call
            st.q.append(q[b : b + 1, :, q.shape[-2] - n_q :].float().cpu().clone())
            st.k.append(k[b : b + 1, :, k.shape[-2] - n_k :].float().cpu().clone())
            st.v.append(v[b : b + 1, :, v.shape[-2] - n_k :].float().cpu().clone())
            m = call.attn_mask
            if m is not None:
                m = m[b : b + 1] if m.shape[0] > 1 else m
                m = m[..., m.shape[-2] - n_q :, m.shape[-1] - n_k :].cpu().clone() if m.dim() >= 2 else m
            st.attn_mask.append(m)
        self._add_attention_stats(call)

    @torch.no_grad()
    def _add_attention_stats(self, call: AttentionCall) -> None:
        cfg, st = self.cfg, self.stats
        q, k = call.q[:1].float(), call.k[:1].float()
        h, nq, d = q.shape[1:]
        hkv, nk = k.shape[1], k.shape[2]
        rows = torch.randperm(nq, generator=self._gen)[: cfg.query_samples].sort().values.to(q.device)
        allowed = _allowed_rows(call, rows, nq, nk)
        # Query head i reads KV head i*Hkv//H. When KV heads divide the query heads, a group's
        # queries go through one matmul with their shared keys (no per-query-head copy of K).
        grouped = h % hkv == 0
        keys = k[0] if grouped else k[0, torch.arange(h, device=q.device) * hkv // h]
        groups = hkv if grouped else h
        sink = torch.zeros(h, dtype=torch.float64)
        dmass = torch.zeros(h, cfg.distance_bins, dtype=torch.float64)
        ent = torch.zeros(h, dtype=torch.float64)
        gram = torch.zeros(h, h, dtype=torch.float64)
        # Query rows in chunks over all heads at once: the workspace is bounded by
        # STATS_CHUNK_ELEMENTS (an (H, rows, Nk) block), never (H, query_samples, Nk) at long N.
        step = max(1, STATS_CHUNK_ELEMENTS // max(h * nk, 1))
        keys_t = keys.transpose(-1, -2)
        for lo in range(0, len(rows), step):
            r = rows[lo : lo + step]
            qg = q[0][:, r].reshape(groups, -1, d)  # (groups, H/groups * c, D)
            s = torch.matmul(qg, keys_t).view(h, len(r), nk) * call.scale  # (H, c, Nk)
            s.masked_fill_(~allowed[lo : lo + step], float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
            del s
            sink += p[..., : cfg.sink_tokens].sum((-1, -2)).double().cpu()
            pos_q = r + (nk - nq)
            dist = (pos_q[:, None] - torch.arange(nk, device=q.device)[None, :]).abs()
            bins = torch.clamp(torch.log2(dist.float() + 1).floor().long(), max=cfg.distance_bins - 1)
            flat = p.reshape(h, -1)
            dmass += (
                torch.zeros(h, cfg.distance_bins, device=q.device)
                .scatter_add_(1, bins.reshape(1, -1).expand(h, -1), flat)
                .double()
                .cpu()
            )
            ent -= (p * torch.log(p.clamp_min(1e-12))).sum((-1, -2)).double().cpu()
            unit = torch.nn.functional.normalize(p, dim=-1).reshape(h, -1)
            gram += (unit @ unit.T).double().cpu()
            del p, flat, unit
        n_rows = max(len(rows), 1)
        sink, dmass, ent = (sink / n_rows).float(), (dmass / n_rows).float(), (ent / n_rows).float()
        # mean over sampled rows of the per-row cosine between heads' attention distributions
        sim = (gram / n_rows).float()
        w_old, w_new = self._rows, len(rows)
        tot = w_old + w_new

        def mix(old, new):
            return new if old is None else (old * w_old + new * w_new) / tot

        st.sink_mass, st.distance_mass = mix(st.sink_mass, sink), mix(st.distance_mass, dmass)
        st.entropy, st.head_similarity = mix(st.entropy, ent), mix(st.head_similarity, sim)
        self._rows = tot


def _allowed_rows(call: AttentionCall, rows: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """``(len(rows), Nk)`` bool: which keys the sampled query ``rows`` may see (structure and mask)."""
    allowed = torch.ones(len(rows), nk, dtype=torch.bool, device=call.q.device)
    if call.window:
        allowed = window_allowed(nq, nk, call.window, call.q.device)[rows]
    elif call.causal:
        allowed = causal_allowed(nq, nk, call.q.device)[rows]
    if call.attn_mask is not None:
        m = call.attn_mask[:1]
        m = m.expand(*m.shape[:-2], nq, nk)[..., rows, :]
        extra = m if m.dtype == torch.bool else m > -1.0e3
        allowed = allowed & extra.reshape(-1, len(rows), nk)[0]
    return allowed


@contextlib.contextmanager
def observe(
    config: CalibrationConfig | None = None, sites: Iterable[str] | None = None
) -> Iterator[dict[str, SiteStats]]:
    """Record statistics of every attnopt operator call inside the ``with`` block.

    Yields a dict ``site name -> SiteStats`` that fills as the model runs.
    """
    cfg = config or CalibrationConfig()
    wanted = set(sites) if sites is not None else None
    out: dict[str, SiteStats] = {}

    with dispatch_hook(_Observer(cfg, wanted, out)):
        yield out


class _Observer(DispatchHook):
    """Calibration's hook: one :class:`StatsAccumulator` per wanted site, filled as calls run."""

    def __init__(self, cfg: CalibrationConfig, wanted: set[str] | None, out: dict[str, SiteStats]) -> None:
        self.cfg, self.wanted, self.out = cfg, wanted, out
        self.accs: dict[str, StatsAccumulator] = {}

    def wants_structure(self, site: str) -> bool:
        return self.wanted is None or site in self.wanted

    def __call__(self, site: str, family: str, call: AttentionCall) -> str:
        if self.wants_structure(site):
            acc = self.accs.get(site)
            if acc is None:
                acc = self.accs[site] = StatsAccumulator(site, self.cfg)
                self.out[site] = acc.stats
            acc.add(call)
        return family


def calibrate(
    model: torch.nn.Module,
    calls: list[tuple[tuple, dict]],
    config: CalibrationConfig | None = None,
    sites: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, SiteStats]:
    """Run ``calls`` through ``model`` (whose sites run attnopt operators) and return per-site stats.

    A progress bar appears when calibration takes more than a couple of seconds.
    """
    from tqdm.auto import tqdm

    with observe(config, sites) as stats, torch.no_grad():
        for args, kwargs in tqdm(
            calls, desc="attnopt calibrate", delay=2.0, disable=not progress, leave=False
        ):
            # mapping arguments copied: a model may write into the mapping it is given
            model(*(dict(a) if isinstance(a, Mapping) else a for a in args), **kwargs)
    missing = [s for s in (sites or []) if s not in stats]
    if missing:
        log.warning("calibration saw no call of site(s) %s", ", ".join(missing))
    return stats
