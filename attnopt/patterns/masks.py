"""Classify attention masks by what they allow, not by how the model built them.

A model can build a causal mask from ``triu``, from ``arange`` comparisons, from a registered
buffer or from a ``vmap``-ed ``mask_function``; all of them allow the same (query, key) pairs.
Classifying the *allowed pattern* therefore covers every spelling at once. Whether the result
may stand in for the tensor at other shapes is decided separately, from the graph: only masks
that do not depend on input values (``AttentionSite.mask_static``) are ever dropped, and the
runtime re-checks them once per shape (see :mod:`attnopt.codegen.ops`).
"""

from __future__ import annotations

import torch

__all__ = [
    "additive_to_allowed",
    "as_additive",
    "causal_allowed",
    "classify_allowed",
    "combined_allowed",
    "merge_allowed",
    "repeat_kv_heads",
    "window_allowed",
]

# Additive masks write "masked" as -inf or as a very negative finite number (finfo.min,
# -1e4 in fp16 models, -1e9 in older code). Anything at or below this counts as masked.
_MASKED_BELOW = -1.0e3


def additive_to_allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """Turn a mask tensor into a boolean ``allowed`` tensor, or ``None`` for a real bias.

    Boolean masks follow SDPA's convention (True = attend). Float masks are additive: entries
    that are 0 are allowed, entries at or below -1e3 (or -inf) are masked. A float tensor with
    any other value is a bias (relative position, ALiBi), which no mask kind can represent.
    """
    if mask.dtype == torch.bool:
        return mask
    m = mask.float()
    masked = m <= _MASKED_BELOW
    if not bool(((m == 0) | masked).all()):
        return None
    return ~masked


def causal_allowed(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bottom-right aligned causal pattern: query i sees key j when j <= i + (kv_len - q_len)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i + (kv_len - q_len)


def window_allowed(q_len: int, kv_len: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Causal sliding window: query i sees the ``window`` keys ending at its diagonal."""
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def combined_allowed(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    window: int | None,
    device: torch.device | str,
) -> torch.Tensor | None:
    """The structural (causal / window) part of a mask as a boolean tensor, or None."""
    if window:
        return window_allowed(q_len, kv_len, window, device)
    if causal:
        return causal_allowed(q_len, kv_len, device)
    return None


def merge_allowed(mask: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` restricted to the ``allowed`` pairs, in ``mask``'s own form.

    A boolean mask (True = attend) is and-ed with ``allowed``; an additive float mask gets
    ``-inf`` where ``allowed`` is False; no mask becomes ``allowed`` itself. The one place a
    structural pattern (causal, window, block reachability) is folded into the model's mask.
    """
    if allowed is None:
        return mask
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def as_additive(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A boolean (True = attend) or additive mask as an additive ``dtype`` mask: 0 or ``-inf``.

    The inverse direction of :func:`additive_to_allowed`, for kernels and rewrites that add the
    mask to scores.
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def repeat_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand ``(B, Hkv, N, D)`` keys/values to ``num_heads`` query heads (GQA groups)."""
    hkv = x.shape[1]
    if hkv == num_heads:
        return x
    if num_heads % hkv:
        raise ValueError(f"Expected query heads divisible by key/value heads, but got {num_heads} and {hkv}.")
    return x.repeat_interleave(num_heads // hkv, dim=1)


def classify_allowed(allowed: torch.Tensor) -> tuple[str, int | None]:
    """Name the pattern of a boolean ``allowed`` tensor of shape ``(..., Nq, Nk)``.

    Returns:
        ``(kind, window)`` with kind one of ``"none"`` (everything allowed), ``"causal"``,
        ``"sliding_window"`` (``window`` keys up to the diagonal), ``"padding"`` (a per-batch
        key-padding pattern, optionally on top of causal) or ``"tensor"`` (anything else).
        ``window`` is set only for ``"sliding_window"``.
    """
    if allowed.dim() < 2:
        raise ValueError(
            f"Expected a mask with at least 2 dims (..., Nq, Nk), but got shape {tuple(allowed.shape)}."
        )
    q_len, kv_len = allowed.shape[-2], allowed.shape[-1]
    if bool(allowed.all()):
        return "none", None
    causal = causal_allowed(q_len, kv_len, allowed.device)
    if bool((allowed == causal).all()):
        return "causal", None
    if not bool((allowed & ~causal).any()):
        # Inside the causal triangle: a band of constant width is a sliding window.
        window = int(allowed.reshape(-1, q_len, kv_len).sum(-1).max())
        if window > 0 and bool((allowed == window_allowed(q_len, kv_len, window, allowed.device)).all()):
            return "sliding_window", window
    # Key padding: within each (batch, head) every row sees the same keys, up to causality.
    flat = allowed.reshape(-1, q_len, kv_len)
    keys = flat.any(dim=-2, keepdim=True)  # keys visible to any query
    if bool((flat == keys).all()) or bool((flat == (keys & causal)).all()):
        return "padding", None
    return "tensor", None
