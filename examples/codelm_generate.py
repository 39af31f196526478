"""A Hugging Face causal LM (codelm, trained on Python source) optimised, then used to generate.

Run: ``python examples/codelm_generate.py`` (``ATTNOPT_FAST=1`` for a quick run).
"""

import copy
import os

import torch

import attnopt
from attnopt.demo import bits_per_byte, codelm_calls, load_codelm

FAST = os.environ.get("ATTNOPT_FAST") == "1"
SEQ = 256 if FAST else 2048

model = load_codelm()  # ../shared/models/codelm when present, else a small random Llama
original = copy.deepcopy(model)
calib = codelm_calls(3 if FAST else 6, SEQ)
attnopt.optimize(model, budget="1x" if FAST else "2x", calib=calib)  # same object, same class
print(model._attnopt_plan.summary())

prompt = torch.tensor(list(b"def fibonacci(n):\n    "))[None]
with torch.no_grad():
    got = model.generate(prompt, max_new_tokens=24, do_sample=False)
    want = original.generate(prompt, max_new_tokens=24, do_sample=False)
print("optimised:", bytes(got[0].tolist()).decode("utf-8", "replace"))
print("original: ", bytes(want[0].tolist()).decode("utf-8", "replace"))
held = codelm_calls(1, SEQ, offset=50_000)
print(f"bits/byte: original {bits_per_byte(original, held):.4f}, optimised {bits_per_byte(model, held):.4f}")
