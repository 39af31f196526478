"""What calibration observed at one site: the record the variant families fit on.

Families (:mod:`attnopt.replacements`) read it, calibration (:mod:`attnopt.calibration`)
fills it, the cost model measures errors on it. It lives here, beside
:class:`~attnopt.patterns.site.AttentionSite` (the other per-site record), because it is pure
data: every room reads it and it imports nothing of attnopt's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["MAX_LENGTHS", "SiteStats"]

#: Distinct ``(q_len, kv_len)`` pairs a :class:`SiteStats` remembers.
MAX_LENGTHS = 64


@dataclass
class SiteStats:
    """Calibration record of one site.

    Tensors are on the CPU, float32, in attnopt's ``(B, H, N, D)`` layout (k/v with the site's
    ``num_kv_heads``). ``q``/``k``/``v`` are lists with one entry per kept sequence (batch
    rows are split into separate entries), so sequences of different lengths can coexist.

    Attributes:
        site: the site's name.
        q, k, v: sampled inputs of the site (each ``(1, H, N, D)``).
        attn_mask: the mask tensors that came with each sample (or None), already reduced
            to what applies beyond the site's structural causal/window constraint.
        scale, causal, window: the site's softmax scale and structural mask.
        sink_mass: ``(H,)`` mean attention mass on the first ``sink_tokens`` keys.
        distance_mass: ``(H, distance_bins)`` mean attention mass by query-key distance, bin b
            covering distances in ``[2**b - 1, 2**(b+1) - 1)``; causal sites only (zeros else).
        entropy: ``(H,)`` mean attention entropy in nats.
        head_similarity: ``(H, H)`` mean cosine similarity of attention rows between heads
            (query heads; rows sampled at the same positions).
        num_calls: how many site calls were seen.
        lengths: the distinct ``(q_len, kv_len)`` of the calls seen, most recent last, at most
            :data:`MAX_LENGTHS` of them (so the record does not grow with the calibration set).
    """

    site: str
    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    attn_mask: list[torch.Tensor | None] = field(default_factory=list)
    scale: float = 1.0
    causal: bool = False
    window: int | None = None
    sink_mass: torch.Tensor | None = None
    distance_mass: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    head_similarity: torch.Tensor | None = None
    num_calls: int = 0
    lengths: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_heads(self) -> int:
        return self.q[0].shape[1] if self.q else 0

    def record_length(self, q_len: int, kv_len: int) -> None:
        """Note one call's lengths: moved to the end if seen before, the oldest dropped past the bound."""
        pair = (q_len, kv_len)
        if pair in self.lengths:
            self.lengths.remove(pair)
        self.lengths.append(pair)
        del self.lengths[:-MAX_LENGTHS]

    def samples(self):
        """Iterate ``(q, k, v, attn_mask)`` over the kept sequences."""
        return zip(self.q, self.k, self.v, self.attn_mask)
