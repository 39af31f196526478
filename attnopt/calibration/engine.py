"""Run calibration batches through the model and record, per site, what the families need.

The model runs with every site rewritten to the exact operator; an observer hooked into the
operator sees each site's resolved inputs (q, k, v in ``(B, H, N, D)``, the reduced mask,
scale, causal/window) exactly as variants will. Memory stays bounded: a few sequences of q/k/v
are kept, and statistics come from sampled query rows processed one head at a time.
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
        st.lengths.append((q.shape[-2], k.shape[-2]))
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
        h, nq, _ = q.shape[1:]
        hkv, nk = k.shape[1], k.shape[2]
        rows = torch.randperm(nq, generator=self._gen)[: cfg.query_samples].sort().values.to(q.device)
        allowed = torch.ones(len(rows), nk, dtype=torch.bool, device=q.device)
        if call.window:
            allowed = window_allowed(nq, nk, call.window, q.device)[rows]
        elif call.causal:
            allowed = causal_allowed(nq, nk, q.device)[rows]
        if call.attn_mask is not None:
            m = call.attn_mask[:1]
            m = m.expand(*m.shape[:-2], nq, nk)[..., rows, :]
            extra = m if m.dtype == torch.bool else m > -1.0e3
            allowed = allowed & extra.reshape(-1, len(rows), nk)[0]
        pos_q = rows + (nk - nq)
        dist = (pos_q[:, None] - torch.arange(nk, device=q.device)[None, :]).abs()
        bins = torch.clamp(torch.log2(dist.float() + 1).floor().long(), max=cfg.distance_bins - 1)
        sink = torch.zeros(h)
        dmass = torch.zeros(h, cfg.distance_bins)
        ent = torch.zeros(h)
        probs_all = []
        for hi in range(h):
            kh = k[0, hi * hkv // h]
            s = (q[0, hi, rows] @ kh.T) * call.scale
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            sink[hi] = p[:, : cfg.sink_tokens].sum(-1).mean().cpu()
            dmass[hi] = torch.zeros(cfg.distance_bins, device=q.device).index_add_(
                0, bins.reshape(-1), p.reshape(-1)
            ).cpu() / len(rows)
            ent[hi] = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean().cpu()
            probs_all.append(p.cpu())
        # mean over sampled rows of the per-row cosine between heads' attention distributions
        P = torch.nn.functional.normalize(torch.stack(probs_all), dim=-1)  # (H, rows, Nk)
        sim = torch.einsum("hrn,grn->hg", P, P) / max(len(rows), 1)
        w_old, w_new = self._rows, len(rows)
        tot = w_old + w_new

        def mix(old, new):
            return new if old is None else (old * w_old + new * w_new) / tot

        st.sink_mass, st.distance_mass = mix(st.sink_mass, sink), mix(st.distance_mass, dmass)
        st.entropy, st.head_similarity = mix(st.entropy, ent), mix(st.head_similarity, sim)
        self._rows = tot


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


