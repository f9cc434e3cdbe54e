"""results.json -> results.md: the numbers, the goals of issue #5, and the FLOP arithmetic."""

from __future__ import annotations

# name -> (path in results, goal, preset it applies to)
GOALS = [
    ("64 vs 256 tokens speedup", ("generation", "speedup", "64_vs_256"), 3.5, "cpu"),
    ("32 vs 256 tokens speedup", ("generation", "speedup", "32_vs_256"), 6.0, "cpu"),
    ("best compiled decode / eager", ("backends", "best_speedup"), 2.5, "cpu"),
    ("decode FLOP/s / matmul FLOP/s", ("backends", "decode_flops_fraction"), 0.6, "cpu"),
    ("service efficiency", ("service_efficiency",), 0.9, "cpu"),
    ("batching gain", ("batching_gain",), 3.0, "cpu"),
    ("SiT-XL/1 64 tok bf16 / matmul", ("generation", "sit_64", "fraction_of_matmul"), 0.5, "gpu"),
    ("32 vs 256 tokens speedup", ("generation", "speedup", "32_vs_256"), 18.0, "gpu"),
]


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _f(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def render_markdown(r: dict) -> str:
    m = r["meta"]
    lines = [
        f"# softvq-serve benchmark ({m['preset']}{', quick' if m['quick'] else ''})",
        "",
        f"- command: `{m['command']}`",
        f"- date: {m['date_utc']}, {m.get('seconds', '?')} s",
        f"- machine: {m['machine'].get('gpu') or m['machine'].get('cpu')}, {m['machine']['cpu_count']} cores, "
        f"torch {m['machine']['torch']} ({m['machine']['torch_threads']} threads), dtype {m['dtype']}",
        f"- load average at start: {m['machine'].get('load_average_at_start')}",
        "",
    ]
    b = r.get("backends")
    if b and b.get("decode_speedup_vs_eager"):
        b["best_speedup"] = b["decode_speedup_vs_eager"].get(b["best_compiled_decode_backend"])
    lines += ["## Goals", "", "| measure | value | goal | met |", "|---|---|---|---|"]
    for name, path, goal, preset in GOALS:
        if preset != m["preset"]:
            continue
        v = _get(r, path)
        met = "n/a" if v is None else ("yes" if v >= goal else "**no**")
        lines.append(f"| {name} | {_f(v)} | >= {goal} | {met} |")
    lines.append("")
    g = r.get("generation")
    if g:
        lines += [
            "## a. Generation (sampling + decoding to pixels)",
            "",
            f"matmul rate: {_f(g['matmul_gflops_per_s'], 1)} GFLOP/s",
            "",
            "| pipeline | tokens | batch | steps | images/s | GFLOP/image (sampler + decoder) | achieved GFLOP/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in g["images_per_s"].items():
            d = g["details"][k]
            gf = d["gflops_per_image"]
            lines.append(
                f"| {k} | {d['tokens']} | {d['batch']} | {d['steps']} | {_f(v, 3)} | "
                f"{_f(gf['total'], 1)} ({_f(gf['sampler'], 1)} + {_f(gf['decoder'], 1)}) | {_f(d['achieved_gflops_per_s'], 1)} |"
            )
        lines += ["", "| ratio | measured speedup | FLOP ratio |", "|---|---|---|"]
        for k, v in g["speedup"].items():
            lines.append(f"| {k} | {_f(v)}x | {_f(g['flop_ratio'].get(k))}x |")
        s = g.get("sit_64")
        if s:
            lines += [
                "",
                f"SiT on 64 tokens alone, batch {s['batch']}: {_f(s['gflops_per_s'], 1)} GFLOP/s = "
                f"{_f(s['fraction_of_matmul'])} of the matmul rate.",
                "",
            ]
    if b:
        lines += [
            "## b. Tokenizer backends",
            "",
            f"ViT {b['config']['vit_width_depth_heads']}, {b['config']['tokens']} tokens, batch {b['config']['batch']}; "
            f"decode {_f(b['decode_gflops_per_image'])} GFLOP/image, encode {_f(b['encode_gflops_per_image'])}; "
            f"matmul {_f(b['matmul_gflops_per_s'], 1)} GFLOP/s",
            "",
            "| backend | encode images/s | decode images/s | decode vs eager | decode GFLOP/s | build s |",
            "|---|---|---|---|---|---|",
        ]
        for k in b["decode"]:
            lines.append(
                f"| {k} | {_f(b['encode'].get(k))} | {_f(b['decode'][k])} | {_f(b['decode_speedup_vs_eager'].get(k))}x | "
                f"{_f(b['decode_gflops_per_s'].get(k), 1)} | {_f(b['build_seconds'].get(k), 1)} |"
            )
        for k, e in b.get("errors", {}).items():
            lines.append(f"| {k} | skipped: {e} | | | | |")
        lines += [
            "",
            f"best compiled decode backend: {b['best_compiled_decode_backend']}, "
            f"{_f(b['decode_flops_fraction'])} of the matmul rate (eager: {_f(b['decode_flops_fraction_eager'])})",
            "",
        ]
    s = r.get("service")
    if s:
        lines += [
            "## c-e. HTTP service",
            "",
            f"config: {s['config']}",
            "",
            f"- raw batched model in process: {_f(s['raw_images_per_s'])} images/s",
            f"- through HTTP at saturation: {_f(s['saturation_images_per_s'])} images/s -> "
            f"service efficiency {_f(s['service_efficiency'])}",
            f"- sequential single requests: {_f(s['sequential_images_per_s'])} images/s -> "
            f"batching gain {_f(s['batching_gain'])}x",
            "",
            "| load | offered req/s | achieved req/s | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in s["latency_ms"].items():
            lines.append(
                f"| {k} | {_f(v['offered_rps'])} | {_f(v['achieved_rps'])} | {_f(v['p50'], 0)} | "
                f"{_f(v['p95'], 0)} | {_f(v['p99'], 0)} |"
            )
        lines.append("")
    return "\n".join(lines)
