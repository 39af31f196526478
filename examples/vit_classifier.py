"""A ViT image model (random weights from a config: no download) optimised with attnopt.

Run: ``python examples/vit_classifier.py``.
"""

import copy

import torch
from transformers import ViTConfig, ViTModel

import attnopt

torch.manual_seed(0)
cfg = ViTConfig(
    image_size=64,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    attn_implementation="sdpa",
)
model = ViTModel(cfg).eval()
original = copy.deepcopy(model)
images = [torch.randn(2, 3, 64, 64) for _ in range(2)]
for site in attnopt.find_sites(model, pixel_values=images[0]):
    print(site)
attnopt.optimize(model, budget="1x", calib=[{"pixel_values": x} for x in images])
with torch.no_grad():
    x = torch.randn(2, 3, 64, 64)
    diff = (model(pixel_values=x).last_hidden_state - original(pixel_values=x).last_hidden_state).abs().max()
print(f"max |difference| vs original: {diff:.2e}")
