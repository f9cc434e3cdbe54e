"""Part b: tokenize and decode throughput per backend, and decode against the matmul rate.

The same tokenizer (random weights) runs through each model.backends runner at one batch
size (one bucket). Build time (compile / export + the first call) is reported apart from
the steady-state throughput.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from model.backends import make_tokenizer_runner

from . import models
from .flops import count_flops, matmul_rate, time_call
from .presets import Preset

ROUNDS = 5


def run(preset: Preset, device: torch.device, dtype: torch.dtype, cache_dir: Path, log) -> dict:
    width, depth, heads = preset.backend_vit
    L, B = preset.backend_tokens, preset.backend_batch
    tok = models.softvq(256, L, 32, (width, depth, heads)).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(B, 3, 256, 256, generator=g) * 2 - 1).to(device, dtype)
    with torch.inference_mode():
        tokens = tok.encode(images)
    dec_flops = count_flops(lambda: tok.decode(tokens)) / B
    enc_flops = count_flops(lambda: tok.encode(images)) / B
    log(
        f"  tokenizer ViT {width}x{depth}, {L} tokens, batch {B}: decode {dec_flops / 1e9:.2f}, encode {enc_flops / 1e9:.2f} GFLOP/image"
    )
    decode, encode, build_s, errors, runners = {}, {}, {}, {}, {}
    for name in preset.backends:
        try:
            t0 = time.perf_counter()
            runner = make_tokenizer_runner(tok, name, buckets=[B], cache_dir=cache_dir)
            runner.warmup([B])
            build_s[name] = time.perf_counter() - t0
            runners[name] = runner
            log(f"  {name}: built in {build_s[name]:.1f}s")
        except Exception as e:  # e.g. onnx with bfloat16: recorded, not fatal
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            log(f"  {name}: skipped ({errors[name]})")
    # Round-robin over backends (and the matmul yardstick), best of `rounds` each: all see
    # the same mix of machine load, and the best round is the least disturbed one.
    matmul = 0.0
    for _ in range(ROUNDS):
        matmul = max(matmul, matmul_rate(device, dtype, preset.matmul_sizes, reps=2))
        for name, r in runners.items():
            enc = B / time_call(lambda r=r: r.encode(images), device, reps=1, warm=0)
            dec = B / time_call(lambda r=r: r.decode(tokens), device, reps=1, warm=0)
            encode[name], decode[name] = (
                max(encode.get(name, 0), enc),
                max(decode.get(name, 0), dec),
            )
    for name in runners:
        log(f"  {name}: encode {encode[name]:.2f} img/s, decode {decode[name]:.2f} img/s")
    del runners
    rate = {k: v * dec_flops / 1e9 for k, v in decode.items()}
    fast = {k: v for k, v in decode.items() if k != "eager"}
    best = max(fast, key=fast.get) if fast else "eager"
    result = {
        "decode": decode,
        "encode": encode,
        "build_seconds": build_s,
        "errors": errors,
        "decode_speedup_vs_eager": {k: v / decode["eager"] for k, v in decode.items()}
        if "eager" in decode
        else {},
        "decode_gflops_per_image": dec_flops / 1e9,
        "encode_gflops_per_image": enc_flops / 1e9,
        "decode_gflops_per_s": rate,
        "matmul_gflops_per_s": matmul / 1e9,
        "best_compiled_decode_backend": best,
        "decode_flops_fraction": rate.get(best, 0.0) / (matmul / 1e9),
        "decode_flops_fraction_eager": rate.get("eager", 0.0) / (matmul / 1e9),
        "config": {
            "vit_width_depth_heads": [width, depth, heads],
            "tokens": L,
            "batch": B,
            "image_size": 256,
        },
    }
    log(
        f"  matmul {matmul / 1e9:.1f} GFLOP/s; best compiled decode ({best}) = {result['decode_flops_fraction']:.2f} of it"
    )
    return result
