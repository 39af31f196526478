"""The canonical description of one attention computation found in a graph.

Every matcher, however the model wrote its attention (``F.scaled_dot_product_attention``,
``matmul → softmax → matmul`` in any layout, ``nn.MultiheadAttention``), produces the same
record. Everything downstream — calibration, the families, the planner, the rewriter — works
on these records and never on raw graph shapes.

Semantics fixed here, for every consumer:

* tensors are normalised to ``(batch, heads, seq, head_dim)``;
* ``scale`` is the factor applied to ``q @ k^T`` before the softmax (1.0 when none, as in T5);
* causal masks are *bottom-right aligned*: query ``i`` of ``Nq`` sees key ``j`` of ``Nk`` when
  ``j <= i + (Nk - Nq)`` — the alignment that stays right for decode steps and chunked prefill;
* ``window`` (sliding-window masks) counts the keys a query sees including itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AttentionSite", "MASK_KINDS", "LAYOUTS", "PROJECTION_KEYS", "UNKNOWN_SIZE"]

#: The mask kinds a site can carry. ``padding`` is a key-padding mask that comes from the
#: model's inputs (possibly combined with causal); ``tensor`` any other mask the model computes;
#: ``bias`` an additive bias that is not a mask (relative position, ALiBi).
MASK_KINDS = ("none", "causal", "sliding_window", "padding", "tensor", "bias")

#: How the model laid q out before folding: ``(B, H, N, D)``, ``(B, N, H, D)``, ``(B*H, N, D)``,
#: ``nn.MultiheadAttention``'s sequence-first ``(N, B, E)``, or an einsum's letter order.
LAYOUTS = ("bhnd", "bnhd", "(bh)nd", "nbe", "einsum")

#: Keys of :attr:`AttentionSite.projections`: separate q/k/v projections or one packed ``qkv``,
#: and the output projection ``o``.
PROJECTION_KEYS = ("q", "k", "v", "o", "qkv")

#: What ``batch``/``q_len``/``kv_len`` hold when capture left the size symbolic with no example
#: value to read (see :func:`attnopt.patterns.canon.node_shape`).
UNKNOWN_SIZE = -1


@dataclass
class AttentionSite:
    """One attention computation, normalised.

    Attributes:
        name: owning module path plus the site's index inside that module, e.g.
            ``"model.layers.0.self_attn#0"``; stable across capture methods.
        module_path: dotted path of the module whose ``forward`` computes the site.
        index: order of this site among the sites of ``module_path``.
        pattern: name of the matcher that found it (``"sdpa"``, ``"eager_softmax"``, ...).
        num_heads: query heads.
        num_kv_heads: key/value heads (``< num_heads`` for GQA/MQA after folding repeat_kv).
        head_dim: query/key head dimension; ``head_dim_v`` the value head dimension.
        q_len, kv_len, batch: sizes seen in the example call (:data:`UNKNOWN_SIZE` when symbolic
            without an example value).
        causal: whether a causal constraint applies (alone or under a window/padding mask).
        window: sliding-window size when ``mask == "sliding_window"``.
        cross: cross-attention (keys/values come from another sequence than queries).
        scale: softmax scale, always a float.
        mask: one of :data:`MASK_KINDS`.
        mask_static: the mask depends only on shapes and constants, never on input values;
            such a mask may be replaced by its kind once checked at a given shape.
        dropout: attention dropout probability active in the captured graph.
        layout: how the model laid q out before folding, one of :data:`LAYOUTS`.
        dtype: dtype of q in the example call.
        rewritable: whether attnopt may replace the site; when False ``reason`` says why and the
            site keeps the model's own code.
        reason: why the site is not rewritable (or ``None``).
        projections: module paths of the q/k/v/output projections when the graph shows them
            (keys ``"q"``, ``"k"``, ``"v"``, ``"o"``, or ``"qkv"`` for a packed projection).
        graph: capture-time references into the graph (nodes); never serialised.

    The invariants every site keeps (heads divide evenly, a finite nonzero scale, positive
    sizes, a window exactly on sliding-window masks, ...) are checked by
    :func:`attnopt.patterns.spec.check_site`.
    """

    name: str
    module_path: str
    index: int
    pattern: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    q_len: int
    kv_len: int
    batch: int
    causal: bool
    scale: float
    mask: str = "none"
    window: int | None = None
    mask_static: bool = True
    cross: bool = False
    dropout: float = 0.0
    layout: str = "bhnd"
    dtype: str = "float32"
    rewritable: bool = True
    reason: str | None = None
    projections: dict[str, str] = field(default_factory=dict)
    graph: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mask not in MASK_KINDS:
            raise ValueError(f"Expected mask to be one of {MASK_KINDS}, but got mask={self.mask!r}.")

    @property
    def gqa_groups(self) -> int:
        """Query heads per key/value head (1 for plain multi-head attention)."""
        return self.num_heads // max(self.num_kv_heads, 1)

    def structure(self) -> dict[str, Any]:
        """The shape-independent structure of the site, used for plan fingerprints."""
        return {
            "name": self.name,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "head_dim_v": self.head_dim_v,
            "causal": self.causal,
            "cross": self.cross,
            "mask": self.mask,
            "window": self.window,
            "scale": round(self.scale, 8),
            "rewritable": self.rewritable,
        }

    def to_dict(self) -> dict[str, Any]:
        """All serialisable fields (``graph`` left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "graph"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionSite:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __str__(self) -> str:
        kv = f"/{self.num_kv_heads}kv" if self.num_kv_heads != self.num_heads else ""
        extra = f" window={self.window}" if self.window else ""
        state = "" if self.rewritable else f"  [kept: {self.reason}]"
        return (
            f"{self.name}: {self.pattern} heads={self.num_heads}{kv} d={self.head_dim} "
            f"N={self.q_len}x{self.kv_len} mask={self.mask}{extra} causal={self.causal} "
            f"cross={self.cross} scale={self.scale:.4g}{state}"
        )
