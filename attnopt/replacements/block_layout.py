"""The block-sparse layout every block-sparse kernel consumes (FlexAttention ``BlockMask`` compatible).

Format (``B`` and ``H`` may be 1 and then broadcast over batch / query heads):

* ``q_block``, ``kv_block``: rows of a query block and keys of a key block (default 128/128).
  ``Mq = ceil(q_len / q_block)``, ``Mk = ceil(kv_len / kv_block)``; the last blocks may be ragged.
* ``kv_num_blocks``: int32 ``(B, H, Mq)``, how many *partial* key blocks query block ``m`` computes.
* ``kv_indices``: int32 ``(B, H, Mq, Mk)``, the partial key blocks of query block ``m``: the first
  ``kv_num_blocks[b, h, m]`` entries are valid, ascending; the rest is padding (ignore it).
  A partial block needs the element rule applied inside it (causal diagonal, window edges).
* ``full_kv_num_blocks`` / ``full_kv_indices``: the same for *full* blocks, computed with no
  element mask. ``None`` means "no full blocks" (everything goes through the element rule).
* ``rule`` (:class:`ElementRule`): what a partial block masks, on absolute positions with
  attnopt's bottom-right causal alignment (query ``i`` sits at ``p = i + kv_len - q_len``):
  key ``j`` is allowed iff ``(not causal or j <= p)`` and ``(window is None or j > p - window[h]
  or j < sink)`` and, when ``rule.mask`` is set, ``mask[b, h, i, j]``.

A kernel computes, for each (b, h, query block), the union of its partial and full blocks; the
allowed map is ``full | (partial & rule)`` (see :meth:`BlockLayout.to_dense`). Rows with no
allowed key return zeros, as :func:`attnopt.replacements.exact.attention_reference` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BlockLayout", "ElementRule", "indices_from_selection"]


@dataclass(frozen=True)
class ElementRule:
    """The element mask applied inside partial blocks.

    Attributes:
        causal: bottom-right aligned causal constraint.
        window: keys per query including the diagonal, one per head (length 1 broadcasts), or None.
        sink: leading keys every query sees regardless of ``window``.
        mask: optional explicit bool allowed map ``(B, H, Nq, Nk)`` (``from_dense``), ANDed in.
    """

    causal: bool = True
    window: tuple[int, ...] | None = None
    sink: int = 0
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def allowed(
        self, q_len: int, kv_len: int, heads: int = 1, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Bool ``(B or 1, H or 1, q_len, kv_len)`` allowed map of the rule alone."""
        p = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        j = torch.arange(kv_len, device=device)[None, :]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)[None, None]
        if self.causal:
            allowed = allowed & (j <= p)
        if self.window is not None:
            w = torch.tensor(self.window, device=device).view(1, -1, 1, 1)
            allowed = allowed & ((j > p - w) | (j < self.sink))
        if self.mask is not None:
            allowed = allowed & self.mask.to(device)
        return allowed


def indices_from_selection(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num, indices)`` int32 from a bool ``(..., Mk)`` selection: valid entries first, ascending."""
    mk = selected.shape[-1]
    order = torch.arange(mk, device=selected.device)
    key = (~selected).to(torch.int64) * mk + order
    idx = torch.sort(key, dim=-1).values % mk
    return selected.sum(-1).to(torch.int32), idx.to(torch.int32)


def _expand_blocks(sel: torch.Tensor, q_block: int, kv_block: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Block map ``(B, H, Mq, Mk)`` → element map ``(B, H, q_len, kv_len)``."""
    out = sel.repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)
    return out[..., :q_len, :kv_len]


@dataclass
class BlockLayout:
    """Per-(batch, head, query block) lists of key blocks; see the module docstring for the format."""

    q_len: int
    kv_len: int
    q_block: int
    kv_block: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None = None
    full_kv_indices: torch.Tensor | None = None
    rule: ElementRule = field(default_factory=ElementRule)

    def __post_init__(self) -> None:
        mq, mk = self.num_q_blocks, self.num_kv_blocks
        for name in ("kv_indices", "full_kv_indices"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 4 or t.shape[-2:] != (mq, mk)):
                raise ValueError(
                    f"Expected {name} of shape (B, H, {mq}, {mk}) for q_len={self.q_len}, kv_len={self.kv_len}, "
                    f"blocks {self.q_block}x{self.kv_block}, but got {tuple(t.shape)}."
                )

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.kv_block)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, q_len, kv_len)`` with B/H as stored (1 = broadcast)."""
        b, h = self.kv_indices.shape[:2]
        return (b, h, self.q_len, self.kv_len)

    # -- block maps --------------------------------------------------------------------------
    def _selection(self, num: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor:
        mk = self.num_kv_blocks
        if num is None or idx is None:
            return torch.zeros(self.kv_indices.shape, dtype=torch.bool, device=self.kv_indices.device)
        valid = torch.arange(mk, device=idx.device) < num[..., None].long()
        sel = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        return sel.scatter_(-1, idx.long(), valid)

    def block_map(self) -> torch.Tensor:
        """int8 ``(B, H, Mq, Mk)``: 0 skipped, 1 partial (element rule applies), 2 full."""
        partial = self._selection(self.kv_num_blocks, self.kv_indices)
        full = self._selection(self.full_kv_num_blocks, self.full_kv_indices)
        b = max(partial.shape[0], full.shape[0])
        h = max(partial.shape[1], full.shape[1])
        partial, full = partial.expand(b, h, -1, -1), full.expand(b, h, -1, -1)
        return torch.where(full, 2, torch.where(partial, 1, 0)).to(torch.int8)

    def union(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(num, indices)`` of partial and full blocks together, ascending (what a kernel visits)."""
        return indices_from_selection(self.block_map() > 0)

    def density(self) -> float:
        """Share of the ``Mq x Mk`` blocks computed (partial or full), averaged over batch and heads."""
        return float((self.block_map() > 0).float().mean())

    def sparsity(self) -> float:
        """``1 - density()``: share of blocks skipped (a causal mask alone gives about 0.5)."""
        return 1.0 - self.density()

    def to_dense(self) -> torch.Tensor:
        """Bool ``(B, H, q_len, kv_len)`` allowed map: ``full | (partial & rule)``."""
        bm = self.block_map()
        partial = _expand_blocks(bm == 1, self.q_block, self.kv_block, self.q_len, self.kv_len)
        full = _expand_blocks(bm == 2, self.q_block, self.kv_block, self.q_len, self.kv_len)
        rule = self.rule.allowed(self.q_len, self.kv_len, device=bm.device)
        return full | (partial & rule)

    # -- printing ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        b, h = self.kv_indices.shape[:2]
        return (
            f"BlockLayout(shape=({b}, {h}, {self.q_len}, {self.kv_len}), blocks={self.q_block}x{self.kv_block}, "
            f"rule={self.rule}, density={self.density():.3f})"
        )

    def to_string(self, grid_size: int = 24, batch: int = 0, head: int = 0) -> str:
        """ASCII picture of one (batch, head): ``█`` full, ``░`` partial, blank skipped (FlexAttention style).

        Larger maps are pooled to at most ``grid_size`` rows/columns (a cell shows its densest block kind).
        """
        bm = self.block_map()
        bm = bm[min(batch, bm.shape[0] - 1), min(head, bm.shape[1] - 1)]
        rows = -(-bm.shape[0] // grid_size)
        cols = -(-bm.shape[1] // grid_size)
        pooled = torch.nn.functional.max_pool2d(bm[None].float(), (rows, cols), ceil_mode=True)[0].to(
            torch.int8
        )
        chars = {0: "  ", 1: "░░", 2: "██"}
        lines = ["".join(chars[int(x)] for x in row) for row in pooled]
        title = f"density={self.density():.3f} blocks={self.q_block}x{self.kv_block} (b={batch}, h={head})"
        return "\n".join([title, *lines])

    # -- FlexAttention -----------------------------------------------------------------------
    def to_flex_block_mask(self):
        """This layout as ``torch.nn.attention.flex_attention.BlockMask`` (partial blocks use the rule).

        Raises:
            NotImplementedError: when FlexAttention is not importable, or ``q_block != kv_block``
                is not supported by the installed version.
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError as e:  # pragma: no cover - old torch
            raise NotImplementedError(
                "FlexAttention is not available in this torch; upgrade to torch>=2.5."
            ) from e
        rule = self.rule
        offset = self.kv_len - self.q_len
        window = None if rule.window is None else torch.tensor(rule.window, device=self.kv_indices.device)
        explicit = rule.mask

        def mask_mod(b, h, q_idx, kv_idx):
            p = q_idx + offset
            ok = kv_idx >= 0
            if rule.causal:
                ok = ok & (kv_idx <= p)
            if window is not None:
                w = window[h] if window.numel() > 1 else window[0]
                ok = ok & ((kv_idx > p - w) | (kv_idx < rule.sink))
            if explicit is not None:
                m = explicit[b if explicit.shape[0] > 1 else 0, h if explicit.shape[1] > 1 else 0]
                ok = ok & m[q_idx, kv_idx]
            return ok

        return BlockMask.from_kv_blocks(
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            BLOCK_SIZE=(self.q_block, self.kv_block),
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_block_map(cls, block_map: torch.Tensor, q_len: int, kv_len: int, q_block: int, kv_block: int,
                       rule: ElementRule) -> BlockLayout:  # fmt: skip
        """From an int ``(B, H, Mq, Mk)`` map with 0 skipped / 1 partial / 2 full."""
        num, idx = indices_from_selection(block_map == 1)
        fnum, fidx = indices_from_selection(block_map == 2)
        return cls(q_len, kv_len, q_block, kv_block, num, idx, fnum, fidx, rule)

    @classmethod
    def from_sink_window(
        cls,
        q_len: int,
        kv_len: int,
        sink: int,
        window: int | list[int] | tuple[int, ...],
        *,
        q_block: int = 128,
        kv_block: int = 128,
        device: torch.device | str = "cpu",
    ) -> BlockLayout:
        """Causal attention sinks + sliding window; ``window`` may be one int or one per head.

        Example:
            >>> BlockLayout.from_sink_window(512, 512, sink=4, window=128, q_block=128, kv_block=128).density()
            0.5625
        """
        windows = (window,) if isinstance(window, int) else tuple(int(w) for w in window)
        if any(w < 1 for w in windows) or sink < 0:
            raise ValueError(f"Expected window >= 1 and sink >= 0, but got window={windows}, sink={sink}.")
        mq, mk = -(-q_len // q_block), -(-kv_len // kv_block)
        off = kv_len - q_len
        ps = (torch.arange(mq, device=device) * q_block + off).view(1, mq, 1)  # first query position
        pe = (torch.clamp(torch.arange(1, mq + 1, device=device) * q_block, max=q_len) - 1 + off).view(
            1, mq, 1
        )
        ks = (torch.arange(mk, device=device) * kv_block).view(1, 1, mk)
        ke = (torch.clamp(torch.arange(1, mk + 1, device=device) * kv_block, max=kv_len) - 1).view(1, 1, mk)
        w = torch.tensor(windows, device=device).view(-1, 1, 1)
        any_window = (ks <= pe) & (ke + w - 1 >= ps)
        any_sink = (ks < sink) & (ks <= pe)
        full_causal = ke <= ps
        full_window = (ks > pe - w) | (ke < sink)
        any_ok = any_window | any_sink
        full = any_ok & full_causal & full_window
        bm = torch.where(full, 2, torch.where(any_ok, 1, 0)).to(torch.int8)[None]
        rule = ElementRule(causal=True, window=windows, sink=sink)
        return cls.from_block_map(bm, q_len, kv_len, q_block, kv_block, rule)

    @classmethod
    def from_block_scores(
        cls,
        scores: torch.Tensor,
        q_len: int,
        kv_len: int,
        *,
        q_block: int,
        kv_block: int,
        causal: bool,
        topk: int | torch.Tensor | None = None,
        mass: float | None = None,
        sink_blocks: int = 1,
        local_blocks: int = 1,
    ) -> BlockLayout:
        """Query-aware selection from block scores ``(B, H, Mq, Mk)`` (e.g. pooled ``q @ k^T``).

        Per query block, keeps the ``topk`` highest-scoring key blocks, or the fewest whose softmax
        mass over the block scores reaches ``mass``; always keeps the first ``sink_blocks`` and the
        ``local_blocks`` ending at the (bottom-right) diagonal. Under ``causal`` blocks entirely
        above the diagonal are never kept, and blocks crossing it are partial.
        """
        if (topk is None) == (mass is None):
            raise ValueError(f"Expected exactly one of topk or mass, but got topk={topk}, mass={mass}.")
        mq, mk = scores.shape[-2:]
        dev = scores.device
        off = kv_len - q_len
        pe = torch.clamp(torch.arange(1, mq + 1, device=dev) * q_block, max=q_len) - 1 + off
        ps = torch.arange(mq, device=dev) * q_block + off
        ks = torch.arange(mk, device=dev) * kv_block
        ke = torch.clamp(torch.arange(1, mk + 1, device=dev) * kv_block, max=kv_len) - 1
        reachable = (
            (ks[None, :] <= pe[:, None]) if causal else torch.ones(mq, mk, dtype=torch.bool, device=dev)
        )
        s = scores.float().masked_fill(~reachable, float("-inf"))
        order = torch.argsort(s, dim=-1, descending=True)
        if topk is not None:
            k = torch.as_tensor(topk, device=dev).expand(*s.shape[:-1]) if torch.is_tensor(topk) else topk
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(mk, device=dev).expand_as(order))
            keep = rank < (k[..., None] if torch.is_tensor(k) else k)
        else:
            probs = torch.softmax(s, dim=-1).nan_to_num(0.0)
            sorted_p = torch.gather(probs, -1, order)
            before = torch.cumsum(sorted_p, -1) - sorted_p  # mass of the better blocks
            keep_sorted = before < mass
            keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        diag = pe // kv_block if causal else torch.clamp(pe, max=kv_len - 1) // kv_block
        local = (ks[None, :] // kv_block <= diag[:, None]) & (
            ks[None, :] // kv_block > diag[:, None] - local_blocks
        )
        keep = (keep | local | (torch.arange(mk, device=dev) < sink_blocks)) & reachable
        partial = keep & ~(ke[None, :] <= ps[:, None]) if causal else torch.zeros_like(keep)
        bm = torch.where(keep & ~partial, 2, torch.where(partial, 1, 0)).to(torch.int8)
        return cls.from_block_map(bm, q_len, kv_len, q_block, kv_block, ElementRule(causal=causal))

    @classmethod
    def from_dense(cls, allowed: torch.Tensor, *, q_block: int = 128, kv_block: int = 128) -> BlockLayout:
        """From a bool ``(B, H, Nq, Nk)`` allowed map; ``from_dense(x).to_dense()`` equals ``x``."""
        if allowed.dtype != torch.bool or allowed.dim() != 4:
            raise TypeError(
                f"Expected a bool (B, H, Nq, Nk) tensor, but got {allowed.dtype} {tuple(allowed.shape)}."
            )
        nq, nk = allowed.shape[-2:]
        mq, mk = -(-nq // q_block), -(-nk // kv_block)
        padded = torch.nn.functional.pad(allowed, (0, mk * kv_block - nk, 0, mq * q_block - nq))
        blocks = padded.view(*allowed.shape[:2], mq, q_block, mk, kv_block).float()
        any_ok = blocks.amax(dim=(-1, -3)) > 0
        # A block is full when every in-range element is allowed (padding counts as allowed).
        pad_ok = torch.nn.functional.pad(
            torch.zeros(nq, nk, dtype=torch.bool, device=allowed.device),
            (0, mk * kv_block - nk, 0, mq * q_block - nq),
            value=True,
        ).view(mq, q_block, mk, kv_block)
        all_ok = (blocks.bool() | pad_ok).view_as(blocks).amin(dim=(-1, -3)) > 0
        bm = torch.where(all_ok & any_ok, 2, torch.where(any_ok, 1, 0)).to(torch.int8)
        rule = ElementRule(causal=False, mask=allowed)
        return cls.from_block_map(bm, nq, nk, q_block, kv_block, rule)
