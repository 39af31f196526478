"""Chunked linear attention (causal or not), optionally hybrid with an exact sliding window.

Feature maps are applied on the host: the kernel takes ``φ(q)`` ``(B, Hq, Nq, F)`` and ``φ(k)``
``(B, Hkv, Nk, F)`` (non-negative features, e.g. Hedgehog's), plus ``v`` ``(B, Hkv, Nk, Dv)``.
Query row ``i`` sits at key position ``p_i = i + Nk − Nq`` (bottom-right alignment).

Definition (:func:`attnopt.replacements.linear.linear_feature_reference`, the linear family's, which
this module re-exports as :func:`linear_attention_reference`; one normaliser, rows whose total is 0
give 0):

* linear only: ``w_ij = φ(q_i)·φ(k_j)`` for keys ``j ∈ L_i``; ``L_i = {j <= p_i}`` when causal,
  all keys otherwise;
* hybrid with window ``W`` (causal): keys ``j ∈ E_i = {p_i − W < j <= p_i}`` get exact softmax
  weights ``w_ij = exp(s_ij − m_i)``, ``s_ij = scale · q_i·k_j``, ``m_i = max_{j∈E_i} s_ij``; keys
  ``j ∈ L_i = {j <= p_i − W}`` get linear weights ``w_ij = φ(q_i)·φ(k_j)``;
* ``out_i = Σ_j w_ij v_j / (Σ_j w_ij + eps)`` with ``eps`` the family's
  :data:`~attnopt.replacements.linear.LINEAR_EPS` (0) unless a caller experiments with another.

The hybrid is LoLCATs' sliding-window + linear attention with window factor 1 (a factor on the
linear part can be folded into φ).

Kernel: grid ``(cdiv(Dv, BLOCK_DV), B * Hq)``; each program walks the sequence in chunks of
``CHUNK`` key positions, carrying the state ``S = Σ φ(k_j) v_jᵀ`` ``(F, BLOCK_DV)`` and
``z = Σ φ(k_j)`` in float32: inter-chunk terms are ``φ(q)·S``, intra-chunk terms a masked
``CHUNK × CHUNK`` product. In the hybrid, the linear keys lag the queries by ``W`` and the
window part runs the flash inner step of :mod:`._common` over the ``W + CHUNK − 1`` keys it needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.codegen.triton import source
from attnopt.codegen.triton._common import (
    LOG2E,
    attn_tile,
    autotune_configs,
    cdiv,
    default_scale,
    head_block,
    portable_fallback,
)
from attnopt.replacements.linear import LINEAR_EPS, LinearConfig, hedgehog_features
from attnopt.replacements.linear import linear_feature_reference as linear_attention_reference

__all__ = ["linear_attention", "linear_attention_reference", "linear_kernel"]

_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (4, 3))]
)


@triton.jit
def _linear_chunk(
    S, z, num, den, pq, PK_bh, V_bh, key_start,
    stride_kn, stride_kf, stride_vn, stride_vd,
    offs_c, offs_f, offs_dv, Nk,
    FEAT: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """Linear terms of one query chunk against keys ``[key_start, key_start + CHUNK)``, then fold them into S, z.

    With ``CAUSAL`` the intra-chunk product is masked to key ``<=`` query (chunk-local), which is
    the causal rule when keys are aligned with queries and the ``p − W`` rule when they lag by W.
    """
    kpos = key_start + offs_c
    k_ok = (kpos >= 0) & (kpos < Nk)
    pk = tl.load(PK_bh + kpos[:, None] * stride_kn + offs_f[None, :] * stride_kf,
                 mask=k_ok[:, None] & (offs_f[None, :] < FEAT), other=0.0)  # fmt: skip
    vl = tl.load(V_bh + kpos[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                 mask=k_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # fmt: skip
    if CAUSAL:
        a = tl.dot(pq, tl.trans(pk))
        a = tl.where(offs_c[None, :] <= offs_c[:, None], a, 0.0)
        num += tl.dot(a.to(vl.dtype), vl)
        den += tl.sum(a, 1)
    S += tl.dot(tl.trans(pk), vl)
    z += tl.sum(pk.to(tl.float32), 0)
    return S, z, num, den


@triton.autotune(configs=_CONFIGS, key=["Nq", "Nk", "FEAT", "HEAD_DIM_V", "CAUSAL", "WINDOW", "CHUNK"])
@triton.jit
def _linear_fwd(
    PQ, PK, V, Q, K, Out,
    qk_scale, eps,
    stride_pqb, stride_pqh, stride_pqn, stride_pqf,
    stride_pkb, stride_pkh, stride_pkn, stride_pkf,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, Nq, Nk,
    GROUP: tl.constexpr, FEAT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Dv, BLOCK_DV), B * Hq)``; see the module docstring."""
    tl.static_assert(BLOCK_F >= FEAT)
    tl.static_assert((WINDOW == 0) or CAUSAL)
    pid_v = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // Hq
    h = off_bh % Hq
    hkv = h // GROUP
    offs_c = tl.arange(0, CHUNK)
    offs_f = tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    PQ_bh = PQ + b * stride_pqb + h * stride_pqh
    PK_bh = PK + b * stride_pkb + hkv * stride_pkh
    V_bh = V + b * stride_vb + hkv * stride_vh
    O_bh = Out + b * stride_ob + h * stride_oh
    off = Nk - Nq
    S = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)
    if not CAUSAL:
        for t in range(0, Nk, CHUNK):
            dummy = tl.zeros([CHUNK, BLOCK_F], dtype=PQ.dtype.element_ty)
            S, z, _, _ = _linear_chunk(
                S, z, tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32), tl.zeros([CHUNK], dtype=tl.float32), dummy,
                PK_bh, V_bh, t, stride_pkn, stride_pkf, stride_vn, stride_vd, offs_c, offs_f, offs_dv, Nk,
                FEAT, HEAD_DIM_V, False,
            )  # fmt: skip
    t0 = tl.minimum(0, off)
    if CAUSAL:
        row_start = t0 - off  # rows before the first query feed the state (prefix keys)
    else:
        row_start = 0 * t0
    for r0 in range(row_start, Nq, CHUNK):
        rows = r0 + offs_c
        row_ok = (rows >= 0) & (rows < Nq)
        pq = tl.load(PQ_bh + rows[:, None] * stride_pqn + offs_f[None, :] * stride_pqf,
                     mask=row_ok[:, None] & (offs_f[None, :] < FEAT), other=0.0)  # fmt: skip
        pq32 = pq.to(tl.float32)
        num = tl.dot(pq32, S)
        den = tl.sum(pq32 * z[None, :], 1)
        if CAUSAL:
            S, z, num, den = _linear_chunk(
                S, z, num, den, pq, PK_bh, V_bh, r0 + off - WINDOW,
                stride_pkn, stride_pkf, stride_vn, stride_vd, offs_c, offs_f, offs_dv, Nk,
                FEAT, HEAD_DIM_V, True,
            )  # fmt: skip
        if WINDOW > 0:
            q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # fmt: skip
            K_bh = K + b * stride_kb + hkv * stride_kh
            m_i = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([CHUNK], dtype=tl.float32)
            acc = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)
            pos = rows + off
            for s in range(tl.maximum(r0 + off - WINDOW + 1, 0), tl.minimum(r0 + off + CHUNK, Nk), CHUNK):
                acc, l_i, m_i = attn_tile(
                    acc, l_i, m_i, q, 1.0, K_bh, V_bh, K_bh,
                    stride_kn, stride_kd, stride_vn, stride_vd, 0,
                    s, pos, offs_d, offs_dv, Nk, qk_scale, WINDOW,
                    CHUNK, HEAD_DIM, HEAD_DIM_V, True, True, True, True, 0, 0,
                )  # fmt: skip
            num += acc
            den += l_i
        total = den + eps
        out = tl.where(total[:, None] == 0.0, 0.0, num / tl.where(total == 0.0, 1.0, total)[:, None])
        tl.store(O_bh + rows[:, None] * stride_on + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))  # fmt: skip


def _check(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"linear_attention: expected {name} as a 4-D tensor of dtype {like.dtype} on {like.device}, but got "
            f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}."
        )


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = LINEAR_EPS,
    chunk: int = 64,
    block_dv: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked (hybrid) linear attention; the function is defined in the module docstring.

    Args:
        phi_q, phi_k: features ``(B, Hq, Nq, F)`` and ``(B, Hkv, Nk, F)``, non-negative.
        v: ``(B, Hkv, Nk, Dv)``.
        causal: bottom-right causal (required for a window).
        window, q, k, scale: the exact sliding window (keys incl. the diagonal) and the raw
            ``q (B, Hq, Nq, D)``/``k (B, Hkv, Nk, D)`` its softmax uses; ``scale`` defaults to ``D ** -0.5``.
        eps: added to the normaliser (the family's :data:`~attnopt.replacements.linear.LINEAR_EPS` by default).
        chunk: positions per chunk (power of two >= 16).
        block_dv: value columns per program (default: all, padded to a power of two).
        out: optional preallocated output ``(B, Hq, Nq, Dv)`` in v's dtype.

    Returns:
        ``(B, Hq, Nq, Dv)`` in v's dtype.
    """
    _check("phi_q", phi_q, v)
    _check("phi_k", phi_k, v)
    _check("v", v, v)
    bsz, hq, nq, feat = phi_q.shape
    _, hkv, nk, dv = v.shape
    if phi_k.shape != (bsz, hkv, nk, feat) or v.shape[0] != bsz or hq % hkv:
        raise ValueError(
            f"linear_attention: expected phi_q (B, Hq, Nq, F), phi_k (B, Hkv, Nk, F), v (B, Hkv, Nk, Dv) with "
            f"Hq % Hkv == 0, but got {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}."
        )
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"linear_attention: expected chunk a power of two >= 16, but got {chunk}.")
    window = int(window or 0)
    if window:
        if not causal or q is None or k is None:
            raise ValueError(
                "linear_attention: a window needs causal=True and the raw q and k; pass q=..., k=...."
            )
        _check("q", q, v)
        _check("k", k, v)
        if q.shape[:3] != phi_q.shape[:3] or k.shape[:3] != phi_k.shape[:3] or q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"linear_attention: expected q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) matching the features, "
                f"but got {tuple(q.shape)} and {tuple(k.shape)}."
            )
    else:
        q, k = phi_q, phi_k  # placeholders, unused by the kernel
    head_dim = q.shape[-1]
    scale = default_scale(scale, head_dim)
    block_dv = block_dv or head_block(dv)
    shape = (bsz, hq, nq, dv)
    if out is None:
        out = torch.empty(shape, dtype=v.dtype, device=v.device)
    elif tuple(out.shape) != shape or out.dtype != v.dtype:
        raise ValueError(
            f"linear_attention: expected out {shape} {v.dtype}, but got {tuple(out.shape)} {out.dtype}."
        )
    constexprs = dict(
        GROUP=hq // hkv, FEAT=feat, HEAD_DIM=head_dim, HEAD_DIM_V=dv,
        CHUNK=chunk, BLOCK_F=head_block(feat), BLOCK_D=head_block(head_dim), BLOCK_DV=block_dv,
        CAUSAL=bool(causal), WINDOW=window,
    )  # fmt: skip
    source.record_launch(_linear_fwd, constexprs)
    grid = (cdiv(dv, block_dv), bsz * hq)
    _linear_fwd[grid](
        phi_q, phi_k, v, q, k, out, scale * LOG2E, float(eps),
        *phi_q.stride(), *phi_k.stride(), *v.stride(), *q.stride(), *k.stride(), *out.stride(),
        hq, nq, nk,
        **constexprs,
    )  # fmt: skip
    return out


@register_kernel("linear", "cuda")
def linear_kernel(call: AttentionCall) -> torch.Tensor:
    """``attnopt::linear`` on CUDA with :class:`attnopt.replacements.linear.LinearConfig` semantics.

    ``params = [w_q, b_q, w_k, b_k]`` (Hedgehog maps); the features are computed on the host with
    ``hedgehog_features`` and cast to V's dtype; the normaliser's eps is the family's
    :data:`~attnopt.replacements.linear.LINEAR_EPS`. Mask tensors and a site window go to the
    portable kernel.
    """
    if call.attn_mask is not None:
        return portable_fallback("linear", call, "a model mask tensor")
    if call.window:
        return portable_fallback("linear", call, "a sliding-window site")
    cfg = call.family_config(LinearConfig)
    if cfg.window and not call.causal:
        raise ValueError(
            f"Expected a causal call for the hybrid window={cfg.window}, but got causal=False. "
            "Use window=0 for non-causal attention."
        )
    w_q, b_q, w_k, b_k = call.params[:4]
    v = call.v
    phi_q = hedgehog_features(call.q, w_q, b_q).to(v.dtype).contiguous()
    phi_k = hedgehog_features(call.k, w_k, b_k).to(v.dtype).contiguous()
    chunk = cfg.chunk if cfg.chunk >= 16 and not cfg.chunk & (cfg.chunk - 1) else 64
    return linear_attention(
        phi_q, phi_k, v, causal=call.causal, window=cfg.window or None, q=call.q, k=call.k, scale=call.scale,
        eps=LINEAR_EPS, chunk=min(chunk, 64),
    )  # fmt: skip
