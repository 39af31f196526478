"""attnopt as a ``torch.compile`` backend: attention sites rewritten, the rest compiled by Inductor.

Run: ``python examples/compile_backend.py``. ``backend="attnopt"`` needs no import of attnopt
(it is registered as a ``torch_dynamo_backends`` entry point); ``attnopt.backend(plan=...)``
configures it with a plan.
"""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnopt

torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    attn_implementation="sdpa",
)
model = LlamaForCausalLM(cfg).eval()
reference = copy.deepcopy(model)
ids = torch.randint(0, 128, (1, 64))

compiled = torch.compile(model, backend="attnopt")
plan = attnopt.plan(copy.deepcopy(model), budget="1x", calib=[{"input_ids": ids, "use_cache": False}])
compiled_with_plan = torch.compile(copy.deepcopy(model), backend=attnopt.backend(plan=plan))
with torch.no_grad():
    want = reference(input_ids=ids, use_cache=False).logits
    for name, m in (("backend='attnopt'", compiled), ("attnopt.backend(plan=...)", compiled_with_plan)):
        got = m(input_ids=ids, use_cache=False).logits
        print(f"{name}: max |difference| vs eager original {(got - want).abs().max():.2e}")
