"""What calibration records per site: bounded q/k/v samples and per-head attention statistics.

Memory is bounded by construction: at most ``CalibrationConfig.max_sequences`` sequences of
q/k/v are kept per site (each at most ``max_tokens`` long), and attention statistics are
computed from at most ``query_samples`` sampled query rows per head — never the full N×N map
of a long sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CalibrationConfig", "SiteStats"]


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration keeps.

    Attributes:
        max_sequences: q/k/v sequences kept per site (the first ones seen).
        max_tokens: longest prefix kept of each sequence (positions beyond are dropped).
        query_samples: query rows per head used for attention statistics.
        sink_tokens: the first keys counted as "sink" positions.
        distance_bins: number of log2-spaced distance bins (1, 2, 4, ... tokens back).
        heldout_fraction: share of calib batches kept aside for end-to-end validation.
        seed: sampling seed, so calibration is repeatable.
    """

    max_sequences: int = 4
    max_tokens: int = 4096
    query_samples: int = 256
    sink_tokens: int = 4
    distance_bins: int = 16
    heldout_fraction: float = 0.25
    seed: int = 0


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
        lengths: ``(q_len, kv_len)`` of every call seen.
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

    def samples(self):
        """Iterate ``(q, k, v, attn_mask)`` over the kept sequences."""
        return zip(self.q, self.k, self.v, self.attn_mask)
