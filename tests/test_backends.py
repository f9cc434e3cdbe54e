"""Every backend agrees with eager PyTorch on tiny random models.

float32 within 1e-4, bfloat16 within 2e-2 relative (the issue's tolerances). Batches that are
not a bucket size and batches above the largest bucket are included, so padding and chunking
are exercised. torch.compile on CPU takes tens of seconds per graph: one test per model kind.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters

from model import backends
from model.backends.compiled import CompiledGeneratorRunner, CompiledTokenizerRunner
from tests.tiny_models import make_generator, make_tokenizer

BUCKETS = [1, 4]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_close(a, b, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)
    else:
        assert rel_err(a, b) < 2e-2


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


def check_tokenizer(runner, tok, images, dtype):
    ref_tokens, ref_idx = tok.encode(images.to(dtype), return_indices=True)
    tokens, idx = runner.encode(images)
    assert tokens.shape == ref_tokens.shape and idx.shape == ref_idx.shape
    assert tokens.dtype == dtype
    assert_close(tokens, ref_tokens, dtype)
    # argmax may flip only where two codewords are (numerically) tied; on random data none are.
    assert (idx == ref_idx).float().mean() > (0.99 if dtype == torch.float32 else 0.9)
    ref_images = tok.decode(ref_tokens)
    out = runner.decode(ref_tokens)
    assert out.shape == ref_images.shape
    assert_close(out, ref_images, dtype)


def check_generator(runner, gen, dtype, batch=6):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, gen.num_tokens, gen.token_dim, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.tensor([0, 3, 9, gen.num_classes, 2, 1][:batch])
    with torch.no_grad():
        ref = gen(x.to(dtype), t.to(dtype), y)
    v = runner(x, t, y)
    assert v.shape == ref.shape and v.dtype == dtype
    assert_close(v, ref, dtype)
    assert runner.num_classes == gen.num_classes
    assert (runner.num_tokens, runner.token_dim) == (gen.num_tokens, gen.token_dim)


def test_bucket_padding_and_chunking():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x * 2, x.sum(dim=1)

    x = torch.arange(14.0).reshape(7, 2)
    a, b = backends.run_bucketed(fn, [x], (1, 2, 4))
    assert calls == [4, 4]  # 7 = 4 + 3, the 3 padded to 4
    torch.testing.assert_close(a, x * 2)
    torch.testing.assert_close(b, x.sum(dim=1))
    assert backends.bucket_for(3, (1, 2, 4, 8)) == 4
    with pytest.raises(ValueError):
        backends.bucket_for(9, (1, 2, 4, 8))


def test_only_fixed_shape_runners_pad(images):
    """The padding contract: a runner pads to its buckets only when its backend needs fixed
    shapes (compile; ONNX on GPU providers); eager and ONNX on the CPU never see zero rows.
    Padded or not, every row's result is the same."""
    tok, gen = make_tokenizer(), make_generator()
    seen = []
    plain = backends.make_tokenizer_runner(tok, "eager", buckets=[1, 4])
    padded = backends.make_tokenizer_runner(tok, "eager", buckets=[1, 4])
    padded.fixed_shapes = True  # as a compiled runner is
    for r in (plain, padded):
        inner = r.decode_graph
        r.decode_graph = lambda t, inner=inner: seen.append(t.shape[0]) or inner(t)
    tokens = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = plain.decode(tokens), padded.decode(tokens)
    assert seen == [6, 4, 4]  # unpadded; then 6 = 4 + 2 padded to 4
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Generators pad with the null class; eager and CPU ONNX declare dynamic shapes.
    g = backends.make_generator_runner(gen, "eager", buckets=[4])
    g.fixed_shapes = True
    calls = []
    inner_v = g._velocity
    g._velocity = lambda x, t, y: calls.append(y.tolist()) or inner_v(x, t, y)
    g(torch.zeros(3, 8, 8), torch.ones(3), torch.tensor([1, 2, 3]))
    assert calls == [[1, 2, 3, gen.num_classes]]
    assert not backends.RUNNERS["eager"][0].fixed_shapes
    # compile: static graphs (CUDA graphs) pad; on the CPU its batch axis is dynamic.
    assert not backends.make_tokenizer_runner(tok, "compile").fixed_shapes
    assert not backends.make_generator_runner(gen, "compile").fixed_shapes
    assert CompiledTokenizerRunner(tok, dynamic_batch=False).fixed_shapes
    assert CompiledGeneratorRunner(gen, dynamic_batch=False).fixed_shapes


def test_unknown_backend_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown backend"):
        backends.make_tokenizer_runner(tiny_tokenizer, "tensorrt-magic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_runner_matches_model(images, dtype):
    tok, gen = make_tokenizer().to(dtype), make_generator().to(dtype)
    check_tokenizer(backends.make_tokenizer_runner(tok, "eager"), tok, images, dtype)
    check_generator(backends.make_generator_runner(gen, "eager"), gen, dtype)


def test_eager_with_fused_kernel_modules_matches(images):
    """The fused modules (PyTorch fallback on CPU) give the model's own results."""
    ref_tok, ref_gen = make_tokenizer(), make_generator()
    tok, gen = copy.deepcopy(ref_tok), copy.deepcopy(ref_gen)
    tok_runner = backends.make_tokenizer_runner(tok, "eager", fused_kernels=True)
    gen_runner = backends.make_generator_runner(gen, "eager", fused_kernels=True)
    check_tokenizer(tok_runner, ref_tok, images, torch.float32)
    check_generator(gen_runner, ref_gen, torch.float32)
    assert type(tok.quantize).__name__ == "FusedSoftVectorQuantizer"
    assert set(tok.state_dict()) == set(ref_tok.state_dict())


@pytest.mark.slow
def test_compile_tokenizer_float32(images):
    """On the CPU, compile's batch axis is dynamic: warm-up builds a graph for a batch of one
    and one for the rest, and no batch size builds another (nor is padded)."""
    tok = make_tokenizer()
    runner = backends.make_tokenizer_runner(tok, "compile", buckets=BUCKETS)
    assert runner.backend == "compile" and not runner.fixed_shapes
    runner.warmup()
    graphs = counters["stats"]["unique_graphs"]
    for n in (2, 3, 5, 7, 16):
        images_n = images[torch.arange(n) % len(images)]
        tokens, _ = runner.encode(images_n)
        assert tokens.shape == (n, tok.num_tokens, tok.token_dim)
        assert runner.decode(torch.randn(n, tok.num_tokens, tok.token_dim)).shape[0] == n
    assert counters["stats"]["unique_graphs"] == graphs
    check_tokenizer(runner, tok, images, torch.float32)  # 5 images, one call


@pytest.mark.slow
def test_compile_generator_bfloat16():
    """Static graphs (as on CUDA, where CUDA graphs need them): batches padded to a bucket."""
    gen = make_generator().to(torch.bfloat16)
    runner = CompiledGeneratorRunner(gen, buckets=[8], dynamic_batch=False)
    check_generator(runner, gen, torch.bfloat16)  # 6 padded to 8 with null-class rows


def test_onnx_tokenizer_and_generator(images, tmp_path):
    tok, gen = make_tokenizer(), make_generator()
    runner = backends.make_tokenizer_runner(tok, "onnx", cache_dir=tmp_path)
    assert runner.backend == "onnx"
    check_tokenizer(runner, tok, images, torch.float32)
    check_generator(
        backends.make_generator_runner(gen, "onnx", cache_dir=tmp_path), gen, torch.float32
    )
    exports = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
    assert [n.split("-")[0] for n in exports] == ["decode", "encode", "velocity"]
    assert all("-bdyn-float32-" in n for n in exports)
    # A second runner reuses the cached exports (same model hash) and still agrees.
    again = backends.make_tokenizer_runner(tok, "onnx", cache_dir=tmp_path)
    check_tokenizer(again, tok, images, torch.float32)
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == exports
    # Different weights, different key.
    other = make_tokenizer(seed=7)
    assert backends.model_hash(other) != backends.model_hash(tok)


def test_onnx_refuses_bfloat16_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        backends.make_tokenizer_runner(
            make_tokenizer().to(torch.bfloat16), "onnx", cache_dir=tmp_path
        )


def test_auto_without_measuring_uses_documented_default(tmp_path):
    runner = backends.make_generator_runner(
        make_generator(), "auto", measure=False, cache_dir=tmp_path
    )
    assert runner.backend == backends.AUTO_DEFAULTS["cpu"]


@pytest.mark.slow
def test_auto_measures_and_caches_its_choice(tmp_path):
    gen = make_generator()
    runner = backends.make_generator_runner(gen, "auto", buckets=[2], cache_dir=tmp_path)
    timings = runner.auto_timings
    assert set(timings) == {"eager", "compile", "onnx"}
    assert runner.backend == min(timings, key=timings.get)
    check_generator(runner, gen, torch.float32, batch=2)
    decisions = json.loads((tmp_path / "auto_backend.json").read_text())
    assert [d["backend"] for d in decisions.values()] == [runner.backend]
    again = backends.make_generator_runner(gen, "auto", buckets=[2], cache_dir=tmp_path)
    assert again.backend == runner.backend and again.auto_timings == timings


def test_warmup_runs_every_bucket(tmp_path):
    tok = make_tokenizer()
    runner = backends.make_tokenizer_runner(tok, "eager")
    seen = []
    orig = runner._decode
    runner._decode = lambda tokens: seen.append(tokens.shape[0]) or orig(tokens)
    runner.warmup([4, 1, 2])
    assert seen == [1, 2, 4] and runner.buckets == (1, 2, 4)


# --- model/fast_sampling.py: the CUDA-graph step loop, run uncaptured on the CPU -------------
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_graphed_loop_matches_sample(sampler):
    from model.fast_sampling import GraphedODESampler
    from model.sampling import sample

    gen = make_generator()
    runner = backends.make_generator_runner(gen, "eager")
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(4, gen.num_tokens, gen.token_dim, generator=g)
    labels = torch.tensor([1, 2, 3, 4])
    scale = torch.tensor([1.0, 4.0, 0.5, 2.5], dtype=torch.float64)  # mixed: some unguided
    interval = (0.2, 0.7)  # some steps guided, some not
    want = sample(runner, noise, labels, 6, sampler, cfg_scale=scale, guidance_interval=interval)
    loop = GraphedODESampler(
        runner, 4, noise.shape[1:], 6, sampler, interval, guided=True, capture=False
    )
    got = loop(noise, labels, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # unguided
    want = sample(runner, noise, labels, 6, sampler)
    loop = GraphedODESampler(runner, 4, noise.shape[1:], 6, sampler, guided=False, capture=False)
    torch.testing.assert_close(
        loop(noise, labels, torch.ones(4, dtype=torch.float64)), want, atol=1e-5, rtol=1e-5
    )


def test_sample_graphed_on_cpu_is_sample():
    from model.fast_sampling import sample_graphed
    from model.sampling import sample

    gen = make_generator()
    noise = torch.randn(
        2, gen.num_tokens, gen.token_dim, generator=torch.Generator().manual_seed(2)
    )
    labels = torch.tensor([0, 5])
    got = sample_graphed(gen, noise, labels, 3, "euler", cfg_scale=3.0)
    assert torch.equal(got, sample(gen, noise, labels, 3, "euler", cfg_scale=3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_service_sampling_path_with_cuda_graphs_matches_eager_loop(sampler):
    """What the executor runs on a GPU (sample_latents with cuda_graphs=True: a captured,
    replayed graph) against the plain step loop, guided with mixed per-sample scales."""
    from model.pipeline import sample_latents

    runner = backends.make_generator_runner(make_generator().cuda(), "eager")
    args = ([1, 2, 3, 4], [10, 11, 12, 13], 6)
    kw = dict(sampler=sampler, cfg_scale=[1.0, 4.0, 0.5, 2.5], guidance_interval=(0.2, 0.7))
    want = sample_latents(runner, *args, **kw)
    for _ in range(2):  # the second call replays the cached graph
        got = sample_latents(runner, *args, cuda_graphs=True, **kw)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- the service's default backend ----------------------------------------------------------
def test_default_backend_is_auto_and_resolves_by_measurement(
    engine_settings_factory, tmp_path, monkeypatch
):
    """With no SOFTVQ_BACKEND the service times the backends per model and serves the
    fastest; /models shows the concrete choice, and the decision is cached on disk."""
    import json

    from service.registry import ModelRegistry
    from service.settings import Settings

    monkeypatch.delenv("SOFTVQ_BACKEND", raising=False)
    assert Settings().backend == "auto"
    monkeypatch.setenv("SOFTVQ_CACHE_DIR", str(tmp_path))
    reg = ModelRegistry.from_settings(engine_settings_factory(backend="auto", batch_buckets=[2]))
    # Eager serves at once; the measuring happens in tune_backends (a background thread in
    # the service: registry.start_tuning).
    info = reg.info()
    assert {m["backend"] for m in info["tokenizers"] + info["generators"]} == {"eager"}
    reg.warmup()
    reg.tune_backends()
    info = reg.info()
    chosen = [m["backend"] for m in info["tokenizers"] + info["generators"]]
    assert chosen and set(chosen) <= {"eager", "compile", "onnx"}
    # softvq_model_info carries the backend that serves now, and only that one.
    from prometheus_client import REGISTRY

    for m in info["tokenizers"]:
        labels = {"model": m["name"], "kind": "tokenizer", "tokens": "8", "dim": "8"}
        labels.update(device="cpu", dtype="float32")
        assert REGISTRY.get_sample_value("softvq_model_info", {**labels, "backend": m["backend"]})
        if m["backend"] != "eager":
            assert not REGISTRY.get_sample_value(
                "softvq_model_info", {**labels, "backend": "eager"}
            )
    decisions = json.loads((tmp_path / "auto_backend.json").read_text())
    assert len(decisions) == len(chosen)
    for d in decisions.values():
        assert d["backend"] == min(d["seconds"], key=d["seconds"].get)
    tok = reg.tokenizer(None)
    tokens, _ = tok.runner.encode(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 8, 8)
