"""The 2-D latent-diffusion baseline: SiT/2 in the SiT authors' layout and time convention,
and the SD-VAE (diffusers' AutoencoderKL) that decodes its latents."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model
from model.loading import CheckpointError, read_generator_config
from model.sit import GeneratorConfig, SiT2D, parse_time_convention

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny" / "sit2d"
TOL = 1e-4


@pytest.fixture(scope="module")
def gen():
    return model.load_generator(FIXTURE)


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "io.safetensors"))


def max_err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def test_fixture_config_is_read_as_the_sit_authors_model(gen):
    c = gen.config
    assert isinstance(gen, SiT2D) and not c.vae_1d
    assert (c.input_size, c.patch_size, c.in_channels, c.num_classes) == (8, 2, 4, 10)
    assert c.learn_sigma and c.noise_at_zero
    assert gen.latent_shape == (4, 8, 8) and gen.num_tokens == 16


def test_native_output_matches_the_released_code(gen, io):
    """The checkpoint's own output, learned-sigma half included, and its velocity half."""
    with torch.no_grad():
        raw = gen.native(io["x"], io["t"], io["y"])  # y holds the null label 10
    assert max_err(raw, io["raw_output"]) < TOL
    assert max_err(raw[:, :4], io["velocity"]) < TOL


def test_sampler_sees_the_flipped_velocity(gen, io):
    """v(x, t) = -model(x, 1 - t, y): at the sampler's t the released model is asked at 1 - t
    and its data - noise prediction is negated into noise - data."""
    with torch.no_grad():
        v = gen(io["x"], 1 - io["t"], io["y"])
    assert max_err(v, -io["velocity"]) < TOL


class PointMass(SiT2D):
    """The exact velocity of the SiT authors' convention for data concentrated at ``target``:
    x_t = t x1 + (1 - t) x0, u = E[x1 - x0 | x_t] = (target - x_t) / (1 - t)."""

    target: torch.Tensor

    def native(self, x, t, y):
        t = t.reshape(-1, 1, 1, 1).to(torch.float64)
        u = (self.target.to(torch.float64) - x.to(torch.float64)) / (1 - t)
        return torch.cat([u, torch.zeros_like(u)], dim=1).to(x.dtype)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_a_noise_at_zero_model_lands_on_its_data(sampler):
    """The convention is tested, not assumed: the samplers integrate from t = 1 (noise) to
    t = 0; a model of the other convention reaches its data only through the flip (without
    it Euler's first step divides by 1 - 1 = 0 and the result is not finite)."""
    cfg = GeneratorConfig(
        input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
        patch_size=2, vae_1d=False, learn_sigma=True, time_convention="noise_at_0",
    )  # fmt: skip
    m = PointMass(cfg).double().eval()
    m.target = torch.arange(64, dtype=torch.float64).reshape(1, 4, 4, 4) / 64
    noise = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = model.sample(m, noise, torch.tensor([0, 2]), 8, sampler=sampler)
    assert max_err(out, m.target.expand(2, -1, -1, -1)) < 1e-9
    m.config.time_convention = "noise_at_1"  # the same model read with SoftVQ's convention
    wrong = model.sample(m, noise, torch.tensor([0, 2]), 8, sampler=sampler)
    assert not torch.isfinite(wrong).all() or max_err(wrong, m.target.expand(2, -1, -1, -1)) > 0.1


def test_time_convention_sentences():
    assert parse_time_convention("t=0 noise, t=1 data; x_t = ...") == "noise_at_0"
    assert parse_time_convention("t = 1 noise -> t = 0 data") == "noise_at_1"
    assert parse_time_convention("noise_at_1") == "noise_at_1"
    with pytest.raises(ValueError):
        parse_time_convention("backwards")


def test_released_sit_file_loads_as_it_is(tmp_path):
    """SiT-XL-2-256x256.pt's layout: a bare state dict (or one under "ema") in a .pt file with
    no config.json; the architecture is read off the shapes. SiT-S/2 keeps the test small;
    SiT-XL/2 differs only in the numbers."""
    cfg = GeneratorConfig(
        input_size=32, in_channels=4, hidden_size=384, depth=12, num_heads=6,
        num_classes=1000, patch_size=2, vae_1d=False, learn_sigma=True,
        time_convention="noise_at_0",
    )  # fmt: skip
    torch.manual_seed(0)
    ref = SiT2D(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.02)
    torch.save(ref.state_dict(), tmp_path / "SiT-S-2-256x256.pt")
    (tmp_path / "ema").mkdir()
    torch.save({"ema": ref.state_dict(), "opt": {}}, tmp_path / "ema" / "checkpoint.pt")

    x = torch.randn(2, 4, 32, 32)
    t, y = torch.tensor([0.3, 0.9]), torch.tensor([207, 1000])
    with torch.no_grad():
        want = ref(x, t, y)
    for where in (tmp_path / "SiT-S-2-256x256.pt", tmp_path / "ema"):
        inferred, raw = read_generator_config(where)
        assert raw == {}
        assert (inferred.depth, inferred.hidden_size, inferred.num_heads) == (12, 384, 6)
        assert inferred.learn_sigma and inferred.noise_at_zero and inferred.num_classes == 1000
        gen = model.load_generator(where)
        with torch.no_grad():
            assert max_err(gen(x, t, y), want) < 1e-5


def test_unpublished_sizes_need_a_config(tmp_path):
    state = model.load_generator(FIXTURE).state_dict()
    torch.save(state, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="config.json"):
        model.load_generator(tmp_path / "tiny.pt")


def test_sd_vae_directory_round_trip(tmp_path):
    """diffusers' AutoencoderKL, saved in the released layout and loaded offline."""
    sd_vae = pytest.importorskip("model.sd_vae")
    pytest.importorskip("diffusers")
    vae = sd_vae.random_sd_vae(width_scale=0.0625, layers_per_block=1)
    sd_vae.save_sd_vae(vae, tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert sd_vae.is_sd_vae_dir(tmp_path / "vae")
    loaded = sd_vae.load_sd_vae(tmp_path / "vae")
    assert loaded.scaling_factor == pytest.approx(0.18215) and loaded.downsample == 8
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        assert loaded.decode(z).shape == (2, 3, 32, 32)
        assert max_err(loaded.decode(z), vae.decode(z)) < 1e-6


def test_exported_backend_keeps_the_flip(gen, io, tmp_path):
    """The ONNX export of a noise-at-0 SiT/2 carries the t -> 1 - t flip and the velocity
    slice (what the service's auto backend may swap in)."""
    pytest.importorskip("onnxruntime")
    from model.backends import make_generator_runner

    runner = make_generator_runner(gen, "onnx", buckets=[1, 4], cache_dir=tmp_path)
    runner.warmup()
    x, t, y = io["x"], io["t"], io["y"]
    with torch.no_grad():
        assert max_err(runner(x, 1 - t, y), -io["velocity"]) < TOL


def test_cli_generates_with_a_released_sit_file_and_an_sd_vae(tmp_path):
    """``softvq generate --generator SiT.pt --vae DIR``: the 2-D baseline without a server,
    the same pixels as model.generate; a 2-D generator with a SoftVQ tokenizer is refused."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from model.images import tensor_to_uint8

    sd_vae = pytest.importorskip("model.sd_vae")
    pytest.importorskip("diffusers")
    sd_vae.save_sd_vae(sd_vae.random_sd_vae(0.0625, 1, sample_size=64), tmp_path / "vae")
    out = tmp_path / "out.png"
    argv = [sys.executable, "-m", "service.cli", "generate", "--generator", str(FIXTURE)]
    r = subprocess.run(
        [*argv, "--vae", str(tmp_path / "vae"), "--class", "4", "--seed", "2", "--steps", "3",
         "-o", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    gen, vae = model.load_generator(FIXTURE), sd_vae.load_sd_vae(tmp_path / "vae")
    want = tensor_to_uint8(model.generate(vae, gen, [4], [2], steps=3))[0]
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    r = subprocess.run([*argv, "--steps", "1"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and "SD-VAE" in r.stderr


def test_gpu_compare_profile_has_the_published_sizes():
    """The gpu profile's networks (never run in CI: no GPU) are the published ones: SiT-XL/2
    with 675M parameters, sd-vae-ft-ema's 83.7M; built on the meta device (no memory)."""
    from model.sd_vae import random_sd_vae
    from model.speed_reference import SIZES, random_sit_1d, random_sit_2d

    sizes = SIZES["gpu"]
    with torch.device("meta"):
        sit2d = random_sit_2d(sizes.latent_side, sizes.sit, sizes.num_classes)
        sit1d = random_sit_1d(64, sizes.vit_1d[64][3], sizes.sit, sizes.num_classes)
        vae = random_sd_vae(sizes.sd_width_scale, sample_size=sizes.image_size)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert abs(count(sit2d) - 675e6) < 1e6, count(sit2d)
    assert abs(count(vae) - 83.65e6) < 0.1e6, count(vae)
    # The same 28 blocks of width 1152 on 64 tokens: within 1 % of SiT-XL/2.
    assert abs(count(sit1d) - count(sit2d)) < 0.01 * count(sit2d)
    assert sizes.dtype == "bfloat16" and sizes.sd_width_scale == 1.0
