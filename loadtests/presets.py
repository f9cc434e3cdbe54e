"""Model sizes and run lengths of the benchmark presets.

cpu: every network at 1/4 of its real width (SiT-XL 1152 -> 288, SoftVQ-B's ViT 768 -> 192,
     SD-VAE channels (128, 256, 512, 512) -> (32, 64, 128, 128)), SiT cut to 6 blocks, so
     the whole suite fits in 15 minutes on 2 shared cores. Ratios between the 1-D and 2-D
     pipelines are what it measures; the absolute images/s are of these small models.
gpu: the real sizes: SiT-XL (28 x 1152), SoftVQ-L (ViT-L decoder, 64 tokens) and SoftVQ-B
     (ViT-B, 32 tokens), full SD-VAE decoder, bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.speed_reference import SIZES


@dataclass
class Preset:
    name: str
    dtype: str  # "float32" | "bfloat16"
    # SiT shared by the 1-D and 2-D generators: (depth, hidden, heads)
    sit: tuple[int, int, int]
    steps: int
    batch: int
    reps: int
    # SoftVQ decoders of the generation comparison: tokens -> (width, depth, heads, token dim)
    vit_1d: dict[int, tuple[int, int, int, int]]
    sd_width_scale: float
    # 512 px comparison (64 vs 1024 tokens), timed once; batch 0 = skipped
    batch_512: int
    steps_512: int
    # part b: the tokenizer timed per backend: (width, depth, heads), tokens, batch
    backend_vit: tuple[int, int, int]
    backend_tokens: int
    backend_batch: int
    backends: tuple[str, ...] = ("eager", "compile", "onnx")
    sd_layers_per_block: int = 2  # SD's VAE (its decoder runs layers_per_block + 1 per level)
    matmul_sizes: tuple[int, ...] = (1024, 2048)
    # parts c-e: the served pair and the load
    service_steps: int = 10
    service_tokens: int = 64
    service_max_batch: int = 16
    service_clients: int = 32
    service_requests: int = 64  # at saturation
    sequential_requests: int = 8
    latency_requests: int = 40  # per load level
    extra: dict = field(default_factory=dict)


CPU = Preset(
    name="cpu",
    dtype="float32",
    sit=SIZES["cpu"].sit,
    steps=20,
    batch=8,
    reps=2,
    vit_1d=SIZES["cpu"].vit_1d,
    sd_width_scale=SIZES["cpu"].sd_width_scale,
    batch_512=1,
    steps_512=10,
    backend_vit=(384, 6, 6),
    backend_tokens=64,
    backend_batch=8,
    service_requests=48,
    latency_requests=24,
)

CPU_QUICK = Preset(
    name="cpu",
    dtype="float32",
    sit=(6, 288, 4),
    steps=6,
    batch=4,
    reps=1,
    vit_1d={32: (192, 12, 3, 64), 64: (192, 12, 3, 32)},
    sd_width_scale=0.25,
    batch_512=0,
    steps_512=0,
    backend_vit=(192, 4, 3),
    backend_tokens=64,
    backend_batch=4,
    service_steps=4,
    extra={"sit_fraction_batch": 8},
    service_max_batch=8,
    service_clients=16,
    service_requests=24,
    sequential_requests=4,
    latency_requests=12,
)

GPU = Preset(
    name="gpu",
    dtype="bfloat16",
    sit=SIZES["gpu"].sit,
    steps=50,
    batch=64,
    reps=2,
    vit_1d=SIZES["gpu"].vit_1d,
    sd_width_scale=SIZES["gpu"].sd_width_scale,
    batch_512=16,
    steps_512=50,
    backend_vit=(1024, 24, 16),
    backend_tokens=64,
    backend_batch=64,
    service_steps=50,
    service_max_batch=64,
    service_clients=128,
    service_requests=512,
    sequential_requests=16,
    latency_requests=256,
    extra={"sit_fraction_batch": 256},
)

GPU_QUICK = Preset(
    name="gpu",
    dtype="bfloat16",
    sit=(28, 1152, 16),
    steps=25,
    batch=32,
    reps=1,
    vit_1d={32: (768, 12, 12, 64), 64: (1024, 24, 16, 32)},
    sd_width_scale=1.0,
    batch_512=0,
    steps_512=0,
    backend_vit=(768, 12, 12),
    backend_tokens=64,
    backend_batch=32,
    service_steps=25,
    service_max_batch=32,
    service_clients=64,
    service_requests=128,
    sequential_requests=8,
    latency_requests=64,
    extra={"sit_fraction_batch": 256},
)


# For the smoke test only: every part end to end in seconds (numbers mean nothing).
TINY = Preset(
    name="tiny",
    dtype="float32",
    sit=(1, 32, 2),
    steps=2,
    batch=2,
    reps=1,
    vit_1d={32: (32, 1, 2, 16), 64: (32, 1, 2, 8)},
    sd_width_scale=0.0625,
    sd_layers_per_block=1,
    matmul_sizes=(256,),
    batch_512=0,
    steps_512=0,
    backend_vit=(32, 1, 2),
    backend_tokens=32,
    backend_batch=2,
    backends=("eager", "onnx"),
    service_steps=2,
    service_max_batch=4,
    service_clients=8,
    service_requests=8,
    sequential_requests=2,
    latency_requests=6,
)


def get(name: str, quick: bool) -> Preset:
    if name == "tiny":
        return TINY
    table = {
        ("cpu", False): CPU,
        ("cpu", True): CPU_QUICK,
        ("gpu", False): GPU,
        ("gpu", True): GPU_QUICK,
    }
    return table[(name, quick)]
