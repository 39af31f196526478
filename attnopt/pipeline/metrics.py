"""How a model call is judged: the output field that matters and the error metrics on it.

A budget's tolerance is in one of these metrics (see :class:`attnopt.Budget`); ``"auto"`` is
resolved here from the model's own output, once, before planning starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from attnopt.cost_model.budget import Budget

__all__ = ["Judged", "default_metric", "judged", "output_error", "resolve_metric"]

log = logging.getLogger("attnopt")


#: Output fields a model call is judged by, most telling first: a language model's logits, a
#: sentence embedding (sentence-transformers), pooled and per-token hidden states.
_PRIMARY_KEYS = ("logits", "sentence_embedding", "last_hidden_state", "token_embeddings", "pooler_output")


@dataclasses.dataclass(frozen=True)
class Judged:
    """What :func:`output_error` reads of one model output: its primary tensor and its loss.

    Kept in place of a whole output where exact outputs are held for many calls (the held-out
    check): a language model's output also carries hidden states or a cache, often several
    times the logits' size.
    """

    key: str | None
    primary: torch.Tensor
    loss: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.primary.nbytes + (self.loss.nbytes if self.loss is not None else 0)


def judged(out: Any) -> Judged:
    """The part of ``out`` that :func:`output_error` compares (see :class:`Judged`)."""
    if isinstance(out, Judged):
        return out
    key, tensor = _primary_field(out)
    loss = getattr(out, "loss", None)
    return Judged(key, tensor.detach(), loss.detach() if isinstance(loss, torch.Tensor) else None)


def _field(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def _primary_field(out: Any) -> tuple[str | None, torch.Tensor]:
    """``(field name or None, tensor)``: what a model call is judged by.

    A named field of :data:`_PRIMARY_KEYS` when the output has one, else its first floating
    tensor (sentence-transformers' output dict also holds the integer ``input_ids``).
    """
    if isinstance(out, torch.Tensor):
        return None, out
    if isinstance(out, Judged):
        return out.key, out.primary
    for key in _PRIMARY_KEYS:
        v = _field(out, key)
        if isinstance(v, torch.Tensor):
            return key, v
    tensors = list(_tensors_in(out))
    floating = [x for x in tensors if x.is_floating_point()]
    if floating or tensors:
        return None, (floating or tensors)[0]
    raise TypeError(f"Expected a model output containing a tensor, but got {type(out).__name__}.")


def _tensors_in(out: Any):
    """Every tensor of a (nested) output, in order: mappings (``ModelOutput``), lists, tuples."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, Mapping):
        for v in out.values():
            yield from _tensors_in(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors_in(v)


def _primary(out: Any) -> torch.Tensor:
    return _primary_field(out)[1]


def default_metric(out: Any) -> str:
    """The metric a model is judged by when the budget says ``metric="auto"``, from its output.

    Logits over a vocabulary, one row per position (``(batch, length, vocab)``), are a language
    model's: next-token divergence (``"perplexity"``), which needs no labels. Hidden states or
    embeddings are an encoder's: ``"cosine"``. Anything else: ``"output_rel_error"``.
    """
    key, tensor = _primary_field(out)
    if key == "logits" and tensor.dim() == 3:
        return "perplexity"
    if key in ("sentence_embedding", "last_hidden_state", "token_embeddings", "pooler_output"):
        return "cosine"
    return "output_rel_error"


def output_error(planned: Any, exact: Any, metric: str) -> float:
    """End-to-end error of one call under ``metric`` (see :class:`attnopt.Budget`).

    ``"perplexity"`` is the expected relative perplexity increase ``exp(KL) - 1``, with ``KL``
    the mean per-token divergence of the planned next-token distribution from the exact one,
    or the increase observed on the call's labels when that is larger. The observed increase
    alone is a noisy judge on a few thousand tokens: on codelm, pruning layer 0's heads
    *lowered* the loss of one calibration text by 0.3% and raised another text's by 1.9%, while
    its divergence was 0.6-1.5% on every text tried. The divergence never credits a change
    for happening to suit the text, and needs no labels.
    """
    a, b = _primary(planned).float(), _primary(exact).float()
    if metric == "perplexity":
        expected = math.expm1(_mean_token_kl(b, a))
        lp, le = getattr(planned, "loss", None), getattr(exact, "loss", None)
        observed = float(torch.exp(lp) / torch.exp(le) - 1.0) if lp is not None and le is not None else 0.0
        return max(expected, observed)
    if metric == "cosine":
        cos = torch.nn.functional.cosine_similarity(
            a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1
        )
        return float(1.0 - cos.min())
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _mean_token_kl(exact_logits: torch.Tensor, planned_logits: torch.Tensor, rows: int = 4096) -> float:
    """Mean over positions of ``KL(softmax(exact) || softmax(planned))`` along the last dim, in nats.

    Computed ``rows`` positions at a time so a large vocabulary never needs a second full-size
    log-probability tensor.
    """
    p = exact_logits.reshape(-1, exact_logits.shape[-1])
    q = planned_logits.reshape(-1, planned_logits.shape[-1])
    total = 0.0
    for i in range(0, p.shape[0], rows):
        lp, lq = p[i : i + rows].log_softmax(-1), q[i : i + rows].log_softmax(-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return max(total / max(p.shape[0], 1), 0.0)


def resolve_metric(budget: Budget, out: Any, calls: list[tuple[tuple, dict]]) -> Budget:
    """``metric="auto"`` made concrete from the model's output (see :func:`default_metric`).

    A call with ``labels`` keeps meaning perplexity, as documented before ``"auto"`` existed.
    """
    if budget.metric != "auto":
        return budget
    metric = default_metric(out)
    if metric == "output_rel_error" and "labels" in calls[0][1]:
        metric = "perplexity"
    log.info(
        "metric: %s (from %s's output), tolerance %g",
        metric,
        type(out).__name__,
        dataclasses.replace(budget, metric=metric).tolerance,
    )
    return dataclasses.replace(budget, metric=metric)
