"""What calibration records per site: bounded q/k/v samples and per-head attention statistics.

Memory is bounded by construction: at most ``CalibrationConfig.max_sequences`` sequences of
q/k/v are kept per site (each at most ``max_tokens`` long), and attention statistics are
computed from at most ``query_samples`` sampled query rows per head — never the full N×N map
of a long sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.patterns.site_stats import SiteStats  # the record itself is pure data, one room down

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
