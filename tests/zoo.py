"""A zoo of tiny models whose attention sites are known, for matcher and rewrite tests.

Each :class:`ZooModel` builds a small random-weight model offline (no downloads) together
with one example call, and states the attention sites a correct matcher must report, in
graph order, with the properties that matter downstream (heads after folding GQA repeats,
scale as the factor on ``q @ k^T``, mask kind, window, causal, cross, rewritable). The
expectations were written from the model sources (transformers 5.23 for the Hugging Face
entries) and are cross-checked against the live models by ``tests/patterns/test_zoo.py``
(its eager ``probe_sites``), so a transformers upgrade that moves a site shows up as a zoo
failure rather than as a matcher bug.

Conventions, shared with :class:`attnopt.patterns.site.AttentionSite`:

* ``num_heads`` are query heads; ``num_kv_heads`` counts key/value heads before any
  ``repeat_kv`` / ``repeat_interleave`` / ``enable_gqa`` broadcast;
* ``scale`` multiplies ``q @ k^T`` where ``q`` is the query projection's output, so a model
  that pre-scales ``q`` (Whisper, :class:`PreScaledAttention`) still has ``1/sqrt(d)``;
* causal masks count as ``"causal"`` however they are built (``tril`` buffer, ``arange``
  comparison, ``generate_square_subsequent_mask``, ``is_causal=True``);
* a model called without an attention mask has mask ``"none"`` even when it builds an
  all-true mask internally;
* ``module_path`` is the innermost module whose ``forward`` computes the attention.

The heavy imports (transformers) happen inside the builders, so importing this module is
cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SEQ",
    "ZOO",
    "ZooModel",
    "by_name",
    "flatten_outputs",
]

#: Default example sequence length; Mistral's window (4) is smaller so the window shows.
SEQ = 12
#: Cross-attention memory length, different from ``SEQ`` so cross sites are visibly cross.
MEM = 10
HIDDEN = 32
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
VOCAB = 64
WINDOW = 4
INV_SQRT_D = 1.0 / math.sqrt(HEAD_DIM)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: how to build the model, how to call it, and the sites it holds.

    Attributes:
        name: unique id, ``"<arch>-<attn_implementation>"`` for Hugging Face entries.
        make_model: builds the model in eval mode from a fixed seed.
        make_inputs: ``(seed, seq_len) -> (args, kwargs)``; ``seq_len=None`` gives ``SEQ``.
        expected: expected sites in graph order (see :func:`site`).
        group: ``"hf"``, ``"torch"``, ``"hand"`` or ``"negative"``.
        attn_implementation: ``"eager"``/``"sdpa"`` for Hugging Face entries, else ``None``.
        varlen: the model accepts a different sequence length than the example (causal LMs
            and encoders with position tables large enough); used for length tests.
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int, int | None], Inputs]
    expected: tuple[dict[str, Any], ...]
    group: str
    attn_implementation: str | None = None
    varlen: bool = False

    def build(self) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        """The model (eval mode, seed 0) and its example call ``(args, kwargs)``."""
        model = self.make_model().eval()
        args, kwargs = self.make_inputs(0, None)
        return model, args, kwargs

    def inputs(self, seed: int, seq_len: int | None = None) -> Inputs:
        """A fresh call of the example's shape (or of length ``seq_len``)."""
        return self.make_inputs(seed, seq_len)

    @property
    def num_sites(self) -> int:
        return len(self.expected)

    @property
    def num_rewritable(self) -> int:
        return sum(1 for e in self.expected if e["rewritable"])


def site(
    module_path: str,
    *,
    heads: int = HEADS,
    kv_heads: int | None = None,
    head_dim: int = HEAD_DIM,
    causal: bool = False,
    cross: bool = False,
    scale: float | None = None,
    mask: str | None = None,
    window: int | None = None,
    rewritable: bool = True,
) -> dict[str, Any]:
    """One expected site; mask defaults to ``"causal"`` when causal else ``"none"``."""
    return {
        "module_path": module_path,
        "num_heads": heads,
        "num_kv_heads": heads if kv_heads is None else kv_heads,
        "head_dim": head_dim,
        "causal": causal,
        "cross": cross,
        "scale": 1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        "mask": mask if mask is not None else ("causal" if causal else "none"),
        "window": window,
        "rewritable": rewritable,
    }


# --------------------------------------------------------------------------- inputs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


def _ids(seed: int, seq_len: int | None, *, low: int = 2) -> torch.Tensor:
    """Token ids avoiding 0/1 (pad ids of several configs)."""
    return torch.randint(low, VOCAB, (2, seq_len or SEQ), generator=_gen(seed))


def _hidden(seed: int, seq_len: int | None, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, seq_len or SEQ, HIDDEN, generator=_gen(seed))


def _lm_inputs(seed: int, seq_len: int | None) -> Inputs:
    return (_ids(seed, seq_len),), {"use_cache": False}


def _encoder_inputs(seed: int, seq_len: int | None) -> Inputs:
    return (_ids(seed, seq_len),), {}


def _hidden_inputs(seed: int, seq_len: int | None) -> Inputs:
    return (_hidden(seed, seq_len),), {}


def _cross_inputs(seed: int, seq_len: int | None) -> Inputs:
    g = _gen(seed)
    x = torch.randn(2, seq_len or SEQ, HIDDEN, generator=g)
    mem = torch.randn(2, MEM, HIDDEN, generator=g)
    return (x, mem), {}


# --------------------------------------------------------------------------- Hugging Face


def _hf(build: Callable[[], nn.Module], impl: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = build()
        model.set_attn_implementation(impl)
        return model.eval()

    return make


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=HEADS,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg)


def _llama_like(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        cfg_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[kind]
        extra: dict[str, Any] = {"sliding_window": WINDOW} if kind == "mistral" else {}
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            **extra,
        )
        return model_cls(cfg)

    return build


def _bert_like(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        common = {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": HEADS,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        }
        if kind == "bert":
            return tf.BertModel(tf.BertConfig(**common), add_pooling_layer=False)
        if kind == "roberta":
            return tf.RobertaModel(tf.RobertaConfig(pad_token_id=1, **common), add_pooling_layer=False)
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=HEADS, hidden_dim=64)
        return tf.DistilBertModel(cfg)

    return build


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
    )
    return ViTModel(cfg, add_pooling_layer=False)


def _vit_inputs(seed: int, seq_len: int | None) -> Inputs:
    return (torch.randn(2, 3, 16, 16, generator=_gen(seed)),), {}


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HEAD_DIM,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _seq2seq_inputs(seed: int, seq_len: int | None) -> Inputs:
    src = _ids(seed, MEM)
    tgt = _ids(seed + 7919, seq_len)
    return (), {"input_ids": src, "decoder_input_ids": tgt, "use_cache": False}


def _whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=HIDDEN,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=MEM,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=1,
    )
    return WhisperModel(cfg)


def _whisper_inputs(seed: int, seq_len: int | None) -> Inputs:
    g = _gen(seed)
    # The encoder's stride-2 conv halves 2*MEM frames into MEM positions.
    feats = torch.randn(2, 8, 2 * MEM, generator=g)
    return (), {"input_features": feats, "decoder_input_ids": _ids(seed, seq_len), "use_cache": False}


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 64,
        "eos_token_id": VOCAB - 1,
        "bos_token_id": 1,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "image_size": 16,
        "patch_size": 4,
    }
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _clip_inputs(seed: int, seq_len: int | None) -> Inputs:
    g = _gen(seed)
    ids = torch.randint(2, VOCAB - 1, (2, seq_len or SEQ), generator=g)
    ids[:, -1] = VOCAB - 1  # an EOS token for the pooled output
    return (), {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _layers(fmt: str, n: int = 2, **kw: Any) -> list[dict[str, Any]]:
    return [site(fmt.format(i), **kw) for i in range(n)]


def _hf_entries() -> list[ZooModel]:
    gqa = {"kv_heads": 2, "causal": True}
    t5_enc = _layers("encoder.block.{}.layer.0.SelfAttention", scale=1.0, mask="bias", rewritable=False)
    t5_dec: list[dict[str, Any]] = []
    for i in range(2):
        t5_dec.append(
            site(
                f"decoder.block.{i}.layer.0.SelfAttention",
                causal=True,
                scale=1.0,
                mask="bias",
                rewritable=False,
            )
        )
        # T5 cross-attention adds an all-zeros position bias (no relative bias, no encoder mask).
        t5_dec.append(site(f"decoder.block.{i}.layer.1.EncDecAttention", cross=True, scale=1.0))
    wh_dec: list[dict[str, Any]] = []
    for i in range(2):
        wh_dec.append(site(f"decoder.layers.{i}.self_attn", causal=True))
        wh_dec.append(site(f"decoder.layers.{i}.encoder_attn", cross=True))
    bert = _layers("encoder.layer.{}.attention.self")
    specs: list[tuple[str, Callable[[], nn.Module], Callable[..., Inputs], list[dict[str, Any]], bool]] = [
        ("gpt2", _gpt2, _lm_inputs, _layers("transformer.h.{}.attn", causal=True), True),
        ("llama", _llama_like("llama"), _lm_inputs, _layers("model.layers.{}.self_attn", **gqa), True),
        (
            "mistral",
            _llama_like("mistral"),
            _lm_inputs,
            _layers("model.layers.{}.self_attn", mask="sliding_window", window=WINDOW, **gqa),
            True,
        ),
        ("qwen2", _llama_like("qwen2"), _lm_inputs, _layers("model.layers.{}.self_attn", **gqa), True),
        ("bert", _bert_like("bert"), _encoder_inputs, bert, True),
        (
            "distilbert",
            _bert_like("distilbert"),
            _encoder_inputs,
            _layers("transformer.layer.{}.attention"),
            True,
        ),
        ("roberta", _bert_like("roberta"), _encoder_inputs, bert, True),
        ("vit", _vit, _vit_inputs, _layers("layers.{}.attention"), False),
        ("t5", _t5, _seq2seq_inputs, t5_enc + t5_dec, False),
        ("whisper", _whisper, _whisper_inputs, _layers("encoder.layers.{}.self_attn") + wh_dec, False),
        (
            "clip",
            _clip,
            _clip_inputs,
            _layers("vision_model.encoder.layers.{}.self_attn")
            + _layers("text_model.encoder.layers.{}.self_attn", causal=True),
            False,
        ),
    ]
    out = []
    for arch, build, inputs, expected, varlen in specs:
        for impl in ("eager", "sdpa"):
            out.append(
                ZooModel(
                    name=f"{arch}-{impl}",
                    make_model=_hf(build, impl),
                    make_inputs=inputs,
                    expected=tuple(expected),
                    group="hf",
                    attn_implementation=impl,
                    varlen=varlen,
                )
            )
    return out


# --------------------------------------------------------------------------- torch.nn


class MHABlock(nn.Module):
    """``nn.MultiheadAttention`` called as most user code does (``need_weights=False``)."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        kv = mem if self.cross else x
        out, _ = self.attn(x, kv, kv, need_weights=False)
        return self.norm(x + out)


class MHAModel(nn.Module):
    """Two :class:`MHABlock` layers, self- or cross-attention."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([MHABlock(cross) for _ in range(2)])

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mem)
        return x


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder``, two post-norm layers, no mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class TorchDecoder(nn.Module):
    """``nn.TransformerDecoder``: causal self-attention via ``tgt_mask`` plus cross-attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerDecoderLayer(HIDDEN, HEADS, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=2)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        return self.decoder(tgt, memory, tgt_mask=mask)


def _torch_entries() -> list[ZooModel]:
    dec: list[dict[str, Any]] = []
    for i in range(2):
        dec.append(site(f"decoder.layers.{i}.self_attn", causal=True))
        dec.append(site(f"decoder.layers.{i}.multihead_attn", cross=True))
    return [
        ZooModel("torch-mha-self", lambda: MHAModel(False), _hidden_inputs,
                 tuple(_layers("blocks.{}.attn")), "torch", varlen=True),
        ZooModel("torch-mha-cross", lambda: MHAModel(True), _cross_inputs,
                 tuple(_layers("blocks.{}.attn", cross=True)), "torch", varlen=True),
        ZooModel("torch-encoder", TorchEncoder, _hidden_inputs,
                 tuple(_layers("encoder.layers.{}.self_attn")), "torch", varlen=True),
        ZooModel("torch-decoder", TorchDecoder, _cross_inputs, tuple(dec), "torch", varlen=True),
    ]  # fmt: skip


# --------------------------------------------------------------------------- hand-written


class NanoGPTAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention``: one ``c_attn``, a ``tril`` buffer, ``/ sqrt(d)``."""

    def __init__(self, max_len: int = 64) -> None:
        super().__init__()
        self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.c_proj = nn.Linear(HIDDEN, HIDDEN)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class EinsumAttention(nn.Module):
    """Bidirectional attention kept in ``(B, N, H, D)`` layout with ``einsum``."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, HEADS, HEAD_DIM)
        k = self.k_proj(x).view(B, N, HEADS, HEAD_DIM)
        v = self.v_proj(x).view(B, N, HEADS, HEAD_DIM)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * HEAD_DIM**-0.5
        p = scores.softmax(dim=-1)
        out = torch.einsum("bhnm,bmhd->bnhd", p, v)
        return self.o_proj(out.reshape(B, N, HIDDEN))


class PreScaledAttention(nn.Module):
    """Causal attention that scales ``q`` before ``q @ k^T`` and masks with an ``arange`` test."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.out = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * HEAD_DIM**-0.5
        pos = torch.arange(N, device=x.device)
        allowed = pos[:, None] >= pos[None, :]
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(y.transpose(1, 2).reshape(B, N, HIDDEN))


class MQAAttention(nn.Module):
    """Multi-query attention: one key/value head broadcast with ``repeat_interleave``, causal."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.kv_proj = nn.Linear(HIDDEN, 2 * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, N, 1, 2 * HEAD_DIM).transpose(1, 2).chunk(2, dim=-1)
        k = k.repeat_interleave(HEADS, dim=1)
        v = v.repeat_interleave(HEADS, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM)
        future = torch.triu(torch.ones(N, N, dtype=torch.bool, device=x.device), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        y = scores.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, N, HIDDEN))


class Block(nn.Module):
    """Pre-norm residual block around any attention module and an MLP."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.attn = attn
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 64), nn.GELU(), nn.Linear(64, HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyTransformer(nn.Module):
    """Token embedding, two :class:`Block` s around ``attn_cls``, an LM head."""

    def __init__(self, attn_cls: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(64, HIDDEN)
        self.blocks = nn.ModuleList([Block(attn_cls()) for _ in range(2)])
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _hand_entries() -> list[ZooModel]:
    blocks = "blocks.{}.attn"
    return [
        ZooModel("nanogpt", lambda: TinyTransformer(NanoGPTAttention), _encoder_inputs,
                 tuple(_layers(blocks, causal=True)), "hand", varlen=True),
        ZooModel("einsum-bnhd", lambda: TinyTransformer(EinsumAttention), _encoder_inputs,
                 tuple(_layers(blocks)), "hand", varlen=True),
        ZooModel("prescaled-q", lambda: TinyTransformer(PreScaledAttention), _encoder_inputs,
                 tuple(_layers(blocks, causal=True)), "hand", varlen=True),
        ZooModel("mqa-repeat-interleave", lambda: TinyTransformer(MQAAttention), _encoder_inputs,
                 tuple(_layers(blocks, kv_heads=1, causal=True)), "hand", varlen=True),
    ]  # fmt: skip


# --------------------------------------------------------------------------- negatives


class MoERouter(nn.Module):
    """Top-2 mixture of experts: softmax over expert logits, then a matmul with expert outputs.

    A hard negative: ``softmax → matmul`` appears, but the softmax input is a linear layer's
    output, not a product of two activations.
    """

    def __init__(self, experts: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = nn.Linear(HIDDEN, experts, bias=False)
        self.experts = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1)
        top, idx = probs.topk(2, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, N, E, C)
        return (weights.unsqueeze(-2) @ outs).squeeze(-2)


class Classifier(nn.Module):
    """MLP classifier ending in a softmax over class logits."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(HIDDEN, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mean(dim=1)).softmax(dim=-1)


class PlainMLP(nn.Module):
    """No softmax, no attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(HIDDEN, 64), nn.GELU(), nn.Linear(64, HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _negative_entries() -> list[ZooModel]:
    return [
        ZooModel("neg-moe-router", MoERouter, _hidden_inputs, (), "negative", varlen=True),
        ZooModel("neg-classifier", Classifier, _hidden_inputs, (), "negative", varlen=True),
        ZooModel("neg-mlp", PlainMLP, _hidden_inputs, (), "negative", varlen=True),
    ]


def _broad_entries() -> list[ZooModel]:
    """The further families of :mod:`tests.zoo_broad` (imported late: it builds on this module)."""
    from tests.zoo_broad import broad_entries, broad_hand_entries

    return broad_entries() + broad_hand_entries()


#: Every zoo entry, Hugging Face first.
ZOO: tuple[ZooModel, ...] = tuple(
    _hf_entries() + _torch_entries() + _hand_entries() + _negative_entries() + _broad_entries()
)


#: Entries that need a newer transformers than pyproject's floor (5.0), found by ``make test-oldest``:
#: name -> (the version they were checked with, what 5.0 lacks). Skipped below that version.
NEEDS_TRANSFORMERS: dict[str, tuple[str, str]] = {
    **{
        f"vit-{impl}": ("5.24", "transformers 5.0 lays ViT out as encoder.layer.N.attention.attention, "
                        "not layers.N.attention")
        for impl in ("eager", "sdpa")
    },
    "gptj-sdpa": ("5.24", "transformers 5.0 has no SDPA attention for GPT-J"),
    "codegen-sdpa": ("5.24", "transformers 5.0 has no SDPA attention for CodeGen"),
    "codegen-eager": ("5.24", "the zoo's runtime probe cannot place CodeGen's attention in a module under 5.0"),
}  # fmt: skip


def version_skip(entry: ZooModel) -> str | None:
    """Why ``entry`` cannot run with the installed transformers, or None."""
    need = NEEDS_TRANSFORMERS.get(entry.name)
    if need is None:
        return None
    try:
        import transformers
        from packaging.version import Version
    except ImportError:
        return None
    if Version(transformers.__version__) >= Version(need[0]):
        return None
    return f"{entry.name} needs transformers>={need[0]} ({need[1]}); installed {transformers.__version__}"


def by_name(name: str) -> ZooModel:
    """The zoo entry called ``name``."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise ValueError(f"Expected a zoo model name, but got {name!r}. Known: {[e.name for e in ZOO]}.")


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, dict or ``ModelOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []
