"""A plain ``nn.TransformerEncoder`` optimised with attnopt.

Run: ``python examples/torch_encoder.py``.
"""

import copy

import torch
import torch.nn as nn

import attnopt

torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True, dropout=0.0)
model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
original = copy.deepcopy(model)
x = torch.randn(2, 32, 64)
for site in attnopt.find_sites(model, x):
    print(site)
attnopt.optimize(model, budget="1x", calib=[x])
with torch.no_grad():
    y = torch.randn(2, 32, 64)
    print(f"max |difference| vs original: {(model(y) - original(y)).abs().max():.2e}")
