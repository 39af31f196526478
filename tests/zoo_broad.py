"""More zoo entries: the Hugging Face decoder and encoder families beyond the first eleven.

Kept apart from :mod:`tests.zoo` so each file stays readable; :data:`tests.zoo.ZOO` includes
:func:`broad_entries`. Each family is built from a config with tiny sizes (no downloads) and
covers one more way of writing attention: fused QKV (GPT-NeoX, Phi-3, CodeGen, Falcon),
multi-query (GPTBigCode, Falcon), ALiBi through ``baddbmm`` or an added bias (Bloom, Falcon,
MPT), ``(B*H, N, D)`` layouts (Bloom, DeBERTa-v2), no scale at all (GPT-Neo), computed scales
(DeBERTa-v2), tanh soft-capping (Gemma-2), padding masks (Qwen3) and cross-attention (BART).

The config's ``_attn_implementation`` is set *before* the model is built: several families
(Falcon, GPTBigCode) read it in ``__init__`` or branch on ``self.config._attn_implementation``
in ``forward``, so setting it afterwards alone would silently test the other implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tests.zoo import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    MEM,
    VOCAB,
    WINDOW,
    Inputs,
    ZooModel,
    _encoder_inputs,
    _ids,
    _layers,
    _lm_inputs,
    site,
)

__all__ = ["broad_entries"]

_LM = {
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 1,
}


@dataclass(frozen=True)
class _Family:
    """One Hugging Face family: which classes, which config, where its sites are.

    Attributes:
        arch: the entry name's prefix.
        config: ``transformers`` config class name.
        model: ``transformers`` model class name.
        kwargs: config fields (tiny sizes).
        expected: the expected sites (see :func:`tests.zoo.site`).
        impls: the attention implementations transformers supports for it.
        inputs: the example call.
        varlen: see :class:`tests.zoo.ZooModel`.
    """

    arch: str
    config: str
    model: str
    kwargs: dict[str, Any]
    expected: list[dict[str, Any]]
    impls: tuple[str, ...] = ("eager", "sdpa")
    inputs: Callable[[int, int | None], Inputs] = _lm_inputs
    varlen: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _build(fam: _Family, impl: str) -> Callable[[], nn.Module]:
    """A builder that sets ``config._attn_implementation`` before construction (see module doc)."""

    def make() -> nn.Module:
        import transformers as tf

        torch.manual_seed(0)
        cfg = getattr(tf, fam.config)(**fam.kwargs)
        cfg._attn_implementation = impl
        model = getattr(tf, fam.model)(cfg, **fam.extra)
        model.set_attn_implementation(impl)
        return model.eval()

    return make


def _padded_lm_inputs(seed: int, seq_len: int | None) -> Inputs:
    """A causal LM call whose second row is left-padded, so the mask is causal + padding."""
    ids = _ids(seed, seq_len)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return (ids,), {"attention_mask": mask, "use_cache": False}


def _bart_inputs(seed: int, seq_len: int | None) -> Inputs:
    return (), {
        "input_ids": _ids(seed, MEM),
        "decoder_input_ids": _ids(seed + 7919, seq_len),
        "use_cache": False,
    }


_CAUSAL = {"causal": True}
_GQA = {"kv_heads": 2, "causal": True}
_MQA = {"kv_heads": 1, "causal": True}
_BIAS = {"causal": True, "mask": "bias", "rewritable": False}
_LLAMA_SIZES = {
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
}

_ENCODER = {**_LLAMA_SIZES, "max_position_embeddings": 64, "vocab_size": VOCAB}


def _families() -> list[_Family]:
    """Every family, with its tiny config and expected sites (eager and SDPA agree on them)."""
    sizes, enc = _LLAMA_SIZES, _ENCODER
    layers = "model.layers.{}.self_attn"
    bart_dec = []
    for i in range(2):
        bart_dec += [
            site(f"decoder.layers.{i}.self_attn", causal=True),
            site(f"decoder.layers.{i}.encoder_attn", cross=True),
        ]
    neo = [
        site("transformer.h.0.attn.attention", causal=True, scale=1.0),
        site("transformer.h.1.attn.attention", causal=True, scale=1.0, mask="sliding_window", window=WINDOW),
    ]
    gemma2 = [
        site(
            "model.layers.0.self_attn",
            kv_heads=2,
            causal=True,
            mask="sliding_window",
            window=WINDOW,
            rewritable=False,
        ),
        site("model.layers.1.self_attn", kv_heads=2, causal=True, rewritable=False),
    ]
    return [
        _Family("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", {**_LM, **sizes},
                _layers("gpt_neox.layers.{}.attention", **_CAUSAL)),
        _Family("phi", "PhiConfig", "PhiForCausalLM", {**_LM, **sizes}, _layers(layers, **_CAUSAL)),
        _Family("phi3", "Phi3Config", "Phi3ForCausalLM", {**_LM, **sizes, "num_key_value_heads": 2},
                _layers(layers, **_GQA)),
        _Family("gptj", "GPTJConfig", "GPTJForCausalLM",
                {**_LM, "n_embd": HIDDEN, "n_layer": 2, "n_head": HEADS, "n_positions": 64, "rotary_dim": 4},
                _layers("transformer.h.{}.attn", **_CAUSAL)),
        _Family("codegen", "CodeGenConfig", "CodeGenForCausalLM",
                {**_LM, "n_embd": HIDDEN, "n_layer": 2, "n_head": HEADS, "n_positions": 64, "n_ctx": 64,
                 "rotary_dim": 4}, _layers("transformer.h.{}.attn", **_CAUSAL)),
        _Family("opt", "OPTConfig", "OPTForCausalLM",
                {**_LM, "hidden_size": HIDDEN, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": HEADS,
                 "word_embed_proj_dim": HIDDEN}, _layers("model.decoder.layers.{}.self_attn", **_CAUSAL)),
        _Family("electra", "ElectraConfig", "ElectraModel", {**enc, "embedding_size": HIDDEN},
                _layers("encoder.layer.{}.attention.self"), inputs=_encoder_inputs),
        _Family("stablelm", "StableLmConfig", "StableLmForCausalLM", {**_LM, **sizes, "num_key_value_heads": 2},
                _layers(layers, **_GQA)),
        _Family("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM",
                {**_LM, **sizes, "num_key_value_heads": 2, "sliding_window": None}, _layers(layers, **_GQA)),
        _Family("gemma", "GemmaConfig", "GemmaForCausalLM",
                {**_LM, **sizes, "num_key_value_heads": 1, "head_dim": HEAD_DIM}, _layers(layers, **_MQA)),
        _Family("gpt-bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                {**_LM, "n_embd": HIDDEN, "n_layer": 2, "n_head": HEADS, "n_positions": 64, "multi_query": True},
                _layers("transformer.h.{}.attn", **_MQA)),
        _Family("falcon", "FalconConfig", "FalconForCausalLM",
                {**_LM, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": HEADS},
                _layers("transformer.h.{}.self_attention", **_MQA)),
        _Family("falcon-alibi", "FalconConfig", "FalconForCausalLM",
                {**_LM, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": HEADS, "alibi": True},
                _layers("transformer.h.{}.self_attention", kv_heads=1, **_BIAS)),
        _Family("qwen3-padded", "Qwen3Config", "Qwen3ForCausalLM",
                {**_LM, **sizes, "num_key_value_heads": 2, "head_dim": HEAD_DIM},
                _layers(layers, kv_heads=2, causal=True, mask="padding"), inputs=_padded_lm_inputs),
        _Family("bart", "BartConfig", "BartModel",
                {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": 2, "decoder_layers": 2,
                 "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "encoder_ffn_dim": 64,
                 "decoder_ffn_dim": 64, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1,
                 "eos_token_id": 1, "decoder_start_token_id": 1, "forced_eos_token_id": None},
                _layers("encoder.layers.{}.self_attn") + bart_dec, inputs=_bart_inputs, varlen=False),
        _Family("albert", "AlbertConfig", "AlbertModel", {**enc, "embedding_size": 16},
                _layers("encoder.albert_layer_groups.0.albert_layers.0.attention"), inputs=_encoder_inputs,
                extra={"add_pooling_layer": False}),
        _Family("bloom", "BloomConfig", "BloomForCausalLM",
                {**_LM, "hidden_size": HIDDEN, "n_layer": 2, "n_head": HEADS},
                _layers("transformer.h.{}.self_attention", **_BIAS), impls=("eager",)),
        _Family("deberta-v2", "DebertaV2Config", "DebertaV2Model",
                {**enc, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
                 "max_relative_positions": 16},
                _layers("encoder.layer.{}.attention.self", scale=(3 * HEAD_DIM) ** -0.5, mask="bias",
                        rewritable=False),
                impls=("eager",), inputs=_encoder_inputs),
        _Family("gpt-neo", "GPTNeoConfig", "GPTNeoForCausalLM",
                {**_LM, "hidden_size": HIDDEN, "num_layers": 2, "num_heads": HEADS,
                 "attention_types": [[["global", "local"], 1]], "window_size": WINDOW},
                neo, impls=("eager",)),
        _Family("mpt", "MptConfig", "MptForCausalLM",
                {**_LM, "d_model": HIDDEN, "n_heads": HEADS, "n_layers": 2, "max_seq_len": 64, "expansion_ratio": 2},
                _layers("transformer.blocks.{}.attn", **_BIAS), impls=("eager",)),
        _Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
                {**_LM, **sizes, "num_key_value_heads": 2, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
                 "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
                gemma2, impls=("eager",)),
    ]  # fmt: skip


def broad_entries() -> list[ZooModel]:
    """One :class:`ZooModel` per family and supported attention implementation."""
    out = []
    for fam in _families():
        for impl in fam.impls:
            out.append(
                ZooModel(
                    name=f"{fam.arch}-{impl}",
                    make_model=_build(fam, impl),
                    make_inputs=fam.inputs,
                    expected=tuple(fam.expected),
                    group="hf",
                    attn_implementation=impl,
                    varlen=fam.varlen,
                )
            )
    return out


# --------------------------------------------------------------------------- hand-written


class RepeatKVSDPAAttention(nn.Module):
    """GQA whose K/V heads are expanded (HF's ``repeat_kv``) *before* a plain SDPA call, causal.

    transformers only does this on some paths (a mask plus old torch); written out here so the
    ``expand → reshape`` fold before SDPA is always covered.
    """

    KV_HEADS = 2

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, self.KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, self.KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    @staticmethod
    def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
        b, h, n, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.KV_HEADS, HEAD_DIM).transpose(1, 2)
        rep = HEADS // self.KV_HEADS
        k, v = self._repeat_kv(k, rep), self._repeat_kv(v, rep)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, HIDDEN))


def broad_hand_entries() -> list[ZooModel]:
    """Hand-written entries for shapes no Hugging Face default path reliably produces."""
    from tests.zoo import TinyTransformer

    return [
        ZooModel("gqa-repeat-kv-sdpa", lambda: TinyTransformer(RepeatKVSDPAAttention), _encoder_inputs,
                 tuple(_layers("blocks.{}.attn", kv_heads=2, causal=True)), "hand", varlen=True),
    ]  # fmt: skip
