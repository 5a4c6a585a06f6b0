#!/usr/bin/env python3
"""Writes the committed seed corpus (corpus/<target>/seed-*) from the PEFT fixtures in tests/fixtures.

Run from fuzz/: python3 make_corpus.py. Standard library only. The input formats are described at
the top of each fuzz target (fuzz_targets/*.rs).
"""
import json
import os
import random
import struct

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def read(*parts):
    with open(os.path.join(FIX, *parts), "rb") as f:
        return f.read()


def section(b):
    return struct.pack("<I", len(b)) + b


def safetensors(tensors):
    """tensors: list of (name, dtype, shape, values); F32 as float, I64 as int."""
    header, data = {}, b""
    for name, dtype, shape, values in tensors:
        fmt = {"F32": "<%df", "I64": "<%dq"}[dtype] % len(values)
        raw = struct.pack(fmt, *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def write(target, name, data):
    os.makedirs(os.path.join(OUT, target), exist_ok=True)
    with open(os.path.join(OUT, target, "seed-" + name), "wb") as f:
        f.write(data)


def ctl(flags, n, m):
    return bytes([flags]) + struct.pack("<HH", n, m)


# peft_adapter: control bytes, config, weights, second weights.
mlp = ("peft-vera-mlp", "adapter")
seeded = ("peft-vera-mlp-seeded", "adapter")
a0 = ("peft-vera-train", "multi", "a0")
a1 = ("peft-vera-train", "multi", "a1")
cfg = lambda d: read(*d, "adapter_config.json")
wts = lambda d: read(*d, "adapter_model.safetensors")
write("peft_adapter", "mlp", ctl(0x10, 48, 40) + section(cfg(mlp)) + section(wts(mlp)))
write("peft_adapter", "mlp-bf16-own-n", ctl(0x0A | 0x20, 40, 40) + section(cfg(mlp)) + section(wts(mlp)))
write("peft_adapter", "seeded", ctl(0x01, 64, 64) + section(cfg(seeded)) + section(wts(seeded)))
write("peft_adapter", "seeded-sizes-short", ctl(0x42, 64, 32) + section(cfg(seeded)) + section(wts(seeded)))
write("peft_adapter", "multi", ctl(0x00, 64, 64) + section(cfg(a0)) + section(wts(a0)) + wts(a1))

# cli: argv tokens, config, weights, second weights, input file.
words = [
    "--adapter", "--module", "--input", "--input-key", "--output", "--base", "--weight-key", "--bias-key",
    "--n-max", "--m-max", "--dtype", "--rows-key", "--dy-key", "--weights", "--unmerge", "--in-features",
    "--help", "@adapter", "@adapter2", "@input", "@output", "@output-dir", "@missing", "layers.0", "layers.1",
    "layers.2", "x", "dy", "layers.0.x", "layers.1.x", "layers.0.dy", "layers.0.weight", "layers.0.bias",
    "layers.1.weight", "rows", "f32", "f16", "bf16", "f64", "0", "1", "-1", "24", "40", "48", "64",
    "layers.0=48", "layers.1=40", "layers.2=64", "--", "",
]
subs = ["inspect", "forward", "merge", "grad", "export-lora"]


def argv(sub, *args):
    return bytes([subs.index(sub)] + [words.index(a) for a in args])


rng = random.Random(7)
vals = lambda n: [rng.randint(-16, 16) / 16 for _ in range(n)]
inp = safetensors([
    ("layers.0.x", "F32", [2, 48], vals(96)),
    ("layers.0.dy", "F32", [2, 40], vals(80)),
    ("layers.0.weight", "F32", [40, 48], vals(1920)),
    ("layers.0.bias", "F32", [40], vals(40)),
    ("rows", "I64", [2], [1, -1]),
])
sizes = ("--n-max", "64", "--m-max", "64")
files = lambda b=b"": section(cfg(seeded)) + section(wts(seeded)) + section(b) + inp
write("cli", "inspect", section(argv("inspect", "@adapter")) + files())
write("cli", "forward", section(argv("forward", "--adapter", "@adapter", "--module", "layers.0", "--input", "@input",
                                     "--input-key", "layers.0.x", "--output", "@output", *sizes)) + files(b""))
write("cli", "forward-base-bf16", section(argv(
    "forward", "--adapter", "@adapter", "--module", "layers.0", "--input", "@input", "--input-key", "layers.0.x",
    "--output", "@output", "--base", "@input", "--weight-key", "layers.0.weight", "--bias-key", "layers.0.bias",
    "--dtype", "bf16", *sizes)) + files(b""))
write("cli", "forward-mixed", section(argv(
    "forward", "--adapter", "@adapter", "--adapter", "@adapter2", "--module", "layers.0", "--input", "@input",
    "--input-key", "layers.0.x", "--rows-key", "rows", "--output", "@output", *sizes)) + files(b""))
write("cli", "merge", section(argv("merge", "--adapter", "@adapter", "--module", "layers.0", "--weights", "@input",
                                   "--weight-key", "layers.0.weight", "--output", "@output", "--unmerge", *sizes))
      + files(b""))
write("cli", "grad", section(argv("grad", "--adapter", "@adapter", "--module", "layers.0", "--input", "@input",
                                  "--input-key", "layers.0.x", "--dy-key", "layers.0.dy", "--output", "@output",
                                  *sizes)) + files(b""))
write("cli", "export-lora", section(argv("export-lora", "--adapter", "@adapter", "--output", "@output-dir",
                                         "--in-features", "layers.0=48", "--in-features", "layers.1=40",
                                         "--in-features", "layers.2=64", *sizes)) + files(b""))

# api: arbitrary bytes (the `arbitrary` crate decodes any bytes into a case).
for i in range(4):
    write("api", "random-%d" % i, bytes(rng.randrange(256) for _ in range(64 + 64 * i)))
