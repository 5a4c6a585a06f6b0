#!/usr/bin/env python3
"""Loads an adapter written by vera-kernels with real HuggingFace PEFT and compares outputs.

    cargo run --release --example peft_export -- OUT_DIR
    python3 scripts/peft_load_check.py OUT_DIR        # needs torch, peft, safetensors

Builds the fixtures' MLP (Linear 48 -> 40 -> 64 -> 24, modules layers.0..2), loads
OUT_DIR/adapter with PeftModel.from_pretrained (PEFT regenerates the projections from the saved
seed), and checks PEFT's adapter output for each layer's x against vera-kernels' in
OUT_DIR/ours.safetensors. Exits non-zero on a mismatch.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file

SIZES = [48, 40, 64, 24]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(SIZES, SIZES[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(Net(), f"{out}/adapter").eval()
    ours = load_file(f"{out}/ours.safetensors")
    worst = 0.0
    with torch.no_grad():
        for l in range(3):
            layer = model.base_model.model.layers[l]
            x = ours[f"layers.{l}.x"]
            peft_y = layer(x) - layer.base_layer(x)
            ref = ours[f"layers.{l}.adapter_y"]
            err = ((peft_y - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            print(f"layers.{l}: relative error {err:.2e} (lambda dtype {layer.vera_lambda_d['default'].dtype})")
    if worst > 1e-5:
        sys.exit(f"mismatch: {worst:.2e} > 1e-5")
    print("PEFT loads the adapter and reproduces vera-kernels' outputs")


if __name__ == "__main__":
    main()
