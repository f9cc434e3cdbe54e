"""The Triton kernels against their PyTorch definitions.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1); with one, compiled
on it. Triton reads TRITON_INTERPRET when a function is decorated, including its own
standard library (tl.argmax, tl.maximum), so the variable must be set before triton is first
imported. If something earlier in the session already imported triton (torch.compile does),
this file re-runs itself in a fresh interpreter instead.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
TRITON_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU and not TRITON_PRELOADED:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from model import kernels  # noqa: E402
from model.kernels import reference  # noqa: E402
from tests.tiny_models import make_generator, make_tokenizer  # noqa: E402

needs_fresh_process = pytest.mark.skipif(
    TRITON_PRELOADED and not ON_GPU,
    reason="triton imported without the interpreter: see test_in_fresh_process",
)


@pytest.mark.skipif(
    not TRITON_PRELOADED or ON_GPU, reason="runs only when triton was imported earlier"
)
def test_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tk():
    if TRITON_PRELOADED and not ON_GPU:
        pytest.skip("triton imported without the interpreter: see test_in_fresh_process")
    from model.kernels import triton_kernels

    return triton_kernels


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    "B,G,n,K,D,l2",
    [
        (2, 4, 2, 64, 8, True),
        (3, 2, 5, 100, 12, True),
        (1, 4, 16, 8192 // 64, 32, True),
        (2, 1, 3, 33, 8, False),
    ],
)
def test_soft_quantize_matches_reference_fp32(tk, B, G, n, K, D, l2):
    g = torch.Generator().manual_seed(B * 100 + K)
    z, cb = torch.randn(B, G, n, D, generator=g), torch.randn(G, K, D, generator=g)
    z, cb = z.to(DEV), cb.to(DEV)
    tau = 0.07 if l2 else 1.0
    want_q, want_idx = reference.soft_quantize(z, cb, tau, l2)
    got_q, got_idx = tk.soft_quantize(z, cb, tau, l2)
    assert got_q.shape == want_q.shape and got_idx.shape == want_idx.shape
    assert got_idx.dtype == torch.int64
    torch.testing.assert_close(got_q, want_q, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_idx, want_idx)


def test_soft_quantize_argmax_takes_first_of_ties(tk):
    cb = torch.zeros(1, 70, 4)
    cb[0, 5, 0] = cb[0, 66, 0] = 1.0  # two identical best codewords in different K-blocks
    z = torch.tensor([[[[1.0, 0, 0, 0]]]])
    _, idx = tk.soft_quantize(z.to(DEV), cb.to(DEV), 0.07, True)
    assert idx.item() == 5


def test_soft_quantize_bf16(tk):
    g = torch.Generator().manual_seed(1)
    z, cb = (
        torch.randn(2, 4, 8, 32, generator=g).bfloat16(),
        torch.randn(4, 256, 32, generator=g).bfloat16(),
    )
    z, cb = z.to(DEV), cb.to(DEV)
    want_q, _ = reference.soft_quantize(z, cb, 0.07)
    got_q, _ = tk.soft_quantize(z, cb, 0.07)
    assert got_q.dtype == torch.bfloat16
    assert rel_err(got_q, want_q) < 2e-2


@pytest.mark.parametrize("B,N,H", [(2, 5, 32), (3, 7, 48), (1, 64, 1152)])
def test_modulated_layer_norm_matches_reference(tk, B, N, H):
    g = torch.Generator().manual_seed(H)
    x = torch.randn(B, N, H, generator=g) * 3 + 1
    chunks = torch.randn(B, 6 * H, generator=g).chunk(6, dim=-1)  # strided views, as in SiTBlock
    shift, scale = chunks[3], chunks[4]
    x, shift, scale = x.to(DEV), shift.to(DEV), scale.to(DEV)
    want = reference.modulated_layer_norm(x, shift, scale)
    got = tk.modulated_layer_norm(x, shift, scale)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got16 = tk.modulated_layer_norm(x.bfloat16(), shift.bfloat16(), scale.bfloat16())
    assert got16.dtype == torch.bfloat16
    assert rel_err(got16, reference.modulated_layer_norm(x, shift, scale)) < 2e-2


@needs_fresh_process
def test_dispatch_uses_pytorch_on_cpu(monkeypatch):
    monkeypatch.delenv("SOFTVQ_TRITON_KERNELS", raising=False)
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("SOFTVQ_TRITON_KERNELS", "1")
    assert kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("SOFTVQ_TRITON_KERNELS", "0")
    assert not kernels.use_triton(torch.zeros(1))


def test_whole_models_through_the_kernels(tk, monkeypatch):
    """install_fused_kernels + forced Triton path: encode, decode and the SiT velocity run
    through the interpreted kernels and match the unmodified models."""
    monkeypatch.setenv("SOFTVQ_TRITON_KERNELS", "1")
    ref_tok, ref_gen = make_tokenizer().to(DEV), make_generator().to(DEV)
    tok, gen = copy.deepcopy(ref_tok), copy.deepcopy(ref_gen)
    assert kernels.install_fused_kernels(tok) == 1
    assert kernels.install_fused_kernels(gen) == 2  # one SiT block + the final layer
    assert kernels.install_fused_kernels(gen) == 0
    images = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DEV)
    with torch.no_grad():
        got, got_idx = tok.encode(images, return_indices=True)
        want, want_idx = ref_tok.encode(images, return_indices=True)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got_idx, want_idx)
        x, t, y = (
            torch.randn(3, 8, 8, device=DEV),
            torch.rand(3, device=DEV),
            torch.tensor([0, 4, 10], device=DEV),
        )
        torch.testing.assert_close(gen(x, t, y), ref_gen(x, t, y), atol=1e-4, rtol=1e-4)
