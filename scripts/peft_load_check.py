#!/usr/bin/env python3
"""Loads an adapter written by vera-kernels with real HuggingFace PEFT and compares outputs.

    cargo run --release --example peft_export -- OUT_DIR
    python3 scripts/peft_load_check.py OUT_DIR        # needs torch, peft, safetensors

Builds the fixtures' MLP (Linear 48 -> 40 -> 64 -> 24, modules layers.0..2), loads
OUT_DIR/adapter with PeftModel.from_pretrained (PEFT regenerates the projections from the saved
seed), and checks PEFT's adapter output for each layer's x against vera-kernels' in
OUT_DIR/ours.safetensors. Exits non-zero on a mismatch.

    vera export-lora --adapter VERA_DIR --output LORA_DIR \
        --in-features layers.0=48 --in-features layers.1=40 --in-features layers.2=64
    python3 scripts/peft_load_check.py --lora VERA_DIR LORA_DIR

Loads the VeRA adapter VERA_DIR (of that MLP) and the LoRA adapter LORA_DIR that `vera export-lora`
made from it, each with PeftModel.from_pretrained (the second as a LoraModel), on the same base
MLP, and checks that on random input every layer's adapter output and the model's output agree.
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


def lora_check(vera_dir, lora_dir):
    """The exported LoRA adapter against the VeRA adapter it came from, both loaded by PEFT."""
    from peft.tuners.lora import LoraModel

    torch.manual_seed(0)
    vera = PeftModel.from_pretrained(Net(), vera_dir).eval()
    torch.manual_seed(0)  # the same base weights
    lora = PeftModel.from_pretrained(Net(), lora_dir).eval()
    if not isinstance(lora.base_model, LoraModel):
        sys.exit(f"{lora_dir}: PEFT loaded a {type(lora.base_model).__name__}, not a LoraModel")
    # The factors' dtype as saved (vera export-lora --dtype); PEFT may load them into the model's.
    lora_dtype = next(iter(load_file(f"{lora_dir}/adapter_model.safetensors").values())).dtype
    worst = 0.0
    with torch.no_grad():
        x = torch.randn(7, SIZES[0], generator=torch.Generator().manual_seed(1))
        for l in range(3):
            v_layer = vera.base_model.model.layers[l]
            l_layer = lora.base_model.model.layers[l]
            xl = torch.randn(7, SIZES[l], generator=torch.Generator().manual_seed(2 + l))
            v_y = v_layer(xl) - v_layer.base_layer(xl)
            l_y = l_layer(xl) - l_layer.base_layer(xl)
            err = ((l_y - v_y).abs().max() / v_y.abs().max()).item()
            worst = max(worst, err)
            scaling = l_layer.scaling["default"]
            print(f"layers.{l}: LoRA vs VeRA adapter output, relative error {err:.2e} (LoRA scaling {scaling})")
        v_out, l_out = vera(x), lora(x)
        err = ((l_out - v_out).abs().max() / v_out.abs().max()).item()
        worst = max(worst, err)
        print(f"model: LoRA vs VeRA output, relative error {err:.2e}")
    # f32 factors: both compute in f32 through different association orders (x·lora_Aᵀ·lora_Bᵀ
    # against lambda_b ⊙ ((lambda_d ⊙ x·Aᵀ)·Bᵀ)), a few f32 roundings of a sum, far below 1e-5.
    # f16/bf16 factors: each is rounded once (unit roundoff u), and when PEFT keeps them in that
    # dtype it casts x to it and rounds both products' results to it: at most about four relative
    # errors of u, doubled for cancellation in the sums.
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(lora_dtype, 0.0)
    tol = max(1e-5, 8 * u)
    if worst > tol:
        sys.exit(f"mismatch: {worst:.2e} > {tol:.1e} (LoRA factors in {lora_dtype})")
    print(f"PEFT loads the exported LoRA adapter ({lora_dtype}) and reproduces the VeRA adapter's outputs")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--lora":
        return lora_check(sys.argv[2], sys.argv[3])
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
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
