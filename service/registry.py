"""The models a process serves, by name: tokenizers, SD-VAEs and the generators that sample
for them.

Two generator families share every endpoint, batcher, broker and metric: SiT on a SoftVQ
tokenizer's 1-D tokens, and the 2-D latent-diffusion baseline (SiT/2 on 4-channel latents)
whose latents an SD-VAE (``SOFTVQ_VAES``, model/sd_vae.py) decodes. A generator names its
decoder in ``tokenizer``; ``latent_decoder(name)`` finds either kind, and both de-normalise
latents the same way (``x * vq_std + vq_mean``; for the SD-VAE 1 / scaling factor and 0).

    registry = ModelRegistry.from_settings(settings)          # loads weights, makes runners
    entry = registry.tokenizer("softvq-l-64")                # or None -> the default
    tokens, indices = entry.runner.encode(images)
    registry.warmup()                                        # every batch bucket once
    registry.start_tuning()        # prove compile / onnx / auto in the background, swap in

Every model first serves on ``eager`` (ready as soon as the weights are loaded and warm);
the configured backend is built, proven against eager and (``auto``) timed in a background
thread, then swapped in per model between batches (model.backends.auto).

With no models configured the bundled demo weights (model/demo.py) that exist on disk are
served. ``load_weights=False`` reads only each ``config.json``: the API in Redis mode needs
shapes and names to validate requests but never runs a model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from model.backends import BACKENDS, GeneratorRunner, TokenizerRunner, build_runner
from model.loading import load_generator, load_tokenizer, read_config, read_generator_config
from model.sampling import sampling_settings
from model.sit import SiT
from model.tokenizer import SoftVQTokenizer, TokenizerConfig

from . import metrics
from .backend_tuning import BackendTuner
from .model_config import RegistryError, configured_models

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnknownModel(KeyError):
    """A request named a model this process does not serve (HTTP 404)."""

    def __init__(self, kind: str, name: str, known: list[str]):
        super().__init__(name)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:
        return f"unknown {self.kind} {self.name!r}; served: {', '.join(self.known) or 'none'}"


@dataclass
class TokenizerEntry:
    name: str
    path: Path
    image_size: int
    num_tokens: int
    token_dim: int
    num_codebooks: int
    codebook_size: int
    vq_mean: float
    vq_std: float
    runner: TokenizerRunner | None = None  # None when weights are not loaded
    model: SoftVQTokenizer | None = None


@dataclass
class VAEEntry:
    """An SD-VAE (diffusers AutoencoderKL) that decodes a 2-D generator's latents."""

    name: str
    path: Path
    latent_channels: int
    downsample: int  # image side / latent side
    scaling_factor: float
    runner: Any = None  # EagerVAERunner; None when weights are not loaded
    model: Any = None
    latent_sides: set[int] = dataclass_field(
        default_factory=set
    )  # of the generators it decodes for

    # The generate task de-normalises every decoder's latents as x * vq_std + vq_mean.
    @property
    def vq_mean(self) -> float:
        return 0.0

    @property
    def vq_std(self) -> float:
        return 1.0 / self.scaling_factor


def sampling_defaults(name: str, raw) -> dict:
    """config.json's optional "sampling" block, checked and completed."""
    try:
        return sampling_settings(raw)
    except ValueError as e:
        raise RegistryError(f"generator {name!r}: {e}") from e


# What GET /models says of a speed reference (the compare profile's random-weight models).
SPEED_REFERENCE_NOTE = (
    "speed reference: random weights at the benchmark's sizes; its images are noise and say"
    " nothing about quality"
)


@dataclass
class GeneratorEntry:
    name: str
    path: Path
    tokenizer: str  # the TokenizerEntry or VAEEntry that decodes its latents
    num_classes: int
    num_tokens: int
    token_dim: int
    image_size: int = 0
    latent_shape: tuple[int, ...] = ()  # one sample's latents: (L, D) or (C, H, W)
    family: str = "softvq"  # "softvq": SiT on 1-D tokens | "latent-2d": SiT/p + SD-VAE
    speed_reference: bool = False  # config.json "speed_reference": random weights
    class_names: list[str] | None = None  # config.json "class_names": names of ids 0..N-1
    # config.json "sampling": what /generate uses for fields a request leaves out (steps,
    # sampler, cfg_scale, guidance_interval), for a model whose best settings differ from the
    # service's; always complete here (the service's own defaults fill the gaps)
    sampling: dict = dataclass_field(default_factory=lambda: sampling_settings(None))
    runner: GeneratorRunner | None = None  # callable like the generator: (x, t, y) -> v
    model: SiT | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise RegistryError(f"unknown dtype {name!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


class ModelRegistry:
    def __init__(self, settings, device: torch.device, dtype: torch.dtype, backend: str):
        if backend not in BACKENDS:
            raise RegistryError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.settings = settings
        self.device, self.dtype, self.backend = device, dtype, backend
        self.buckets = sorted(set(settings.batch_buckets))
        self.tokenizers: dict[str, TokenizerEntry] = {}
        self.vaes: dict[str, VAEEntry] = {}
        self.generators: dict[str, GeneratorEntry] = {}
        self.default_tokenizer: str | None = None
        self._generated: set[str] = set()  # roots of models the compare profile wrote
        self.default_generator: str | None = None
        self.loaded = False
        self.warm = False
        # Background proving of the configured backend (start_tuning): ``tuned`` is set once
        # every model is settled.
        self.tuner = BackendTuner(self)
        # Warm-up and batches run on an executor thread; a model is not re-entrant on a GPU.
        self.lock = threading.Lock()

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings, load_weights: bool = True) -> ModelRegistry:
        device = resolve_device(settings.device)
        reg = cls(settings, device, resolve_dtype(settings.dtype, device), settings.backend)
        tokenizers, vaes, generators, defaults = configured_models(settings)
        if settings.compare:  # written by this process (service/compare.py): not confined
            reg._generated = {str(Path(settings.cache_dir or Path.home() / ".cache" / "softvq"))}
        for name, path in tokenizers.items():
            reg.tokenizers[name] = reg._tokenizer_entry(name, reg._confined(path), load_weights)
        for name, path in vaes.items():
            if name in reg.tokenizers:
                raise RegistryError(f"{name!r} names both a tokenizer and an SD-VAE")
            reg.vaes[name] = reg._vae_entry(name, reg._confined(path), load_weights)
        for name, (path, tok_name) in generators.items():
            reg.generators[name] = reg._generator_entry(
                name, reg._confined(path), tok_name, load_weights
            )
        reg.default_tokenizer = defaults[0] or next(iter(reg.tokenizers), None)
        reg.default_generator = defaults[1] or next(iter(reg.generators), None)
        if reg.default_tokenizer is not None and reg.default_tokenizer not in reg.tokenizers:
            raise RegistryError(f"default tokenizer {reg.default_tokenizer!r} is not configured")
        if reg.default_generator is not None and reg.default_generator not in reg.generators:
            raise RegistryError(f"default generator {reg.default_generator!r} is not configured")
        reg.loaded = load_weights
        reg._export_info()
        return reg

    def _confined(self, path: str | Path) -> Path:
        """The resolved directory; refused when it lies outside ``model_root`` (when set).
        ``hf://OWNER/REPO[@REVISION]`` is fetched into (or, offline, found in) the Hugging
        Face cache first (service/hub.py)."""
        from .hub import is_hub_path, resolve_hub_path

        if is_hub_path(str(path)):
            try:
                return resolve_hub_path(str(path))
            except (ValueError, OSError, ImportError) as e:
                raise RegistryError(str(e)) from e
        p = self.settings.resolve(str(path))
        root = self.settings.model_root
        if any(Path(g).resolve() in p.parents for g in self._generated):
            return p
        if root:
            root = Path(root).resolve()
            if p != root and root not in p.parents:
                raise RegistryError(f"model directory {p} lies outside model_root {root}")
        return p

    def _tokenizer_entry(self, name: str, path: Path, load: bool) -> TokenizerEntry:
        try:
            cfg = TokenizerConfig.from_dict(read_config(path))
            tok = load_tokenizer(path, device=self.device, dtype=self.dtype) if load else None
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            raise RegistryError(f"tokenizer {name!r}: {e}") from e
        return TokenizerEntry(
            name=name,
            path=path,
            image_size=cfg.image_size,
            num_tokens=cfg.num_latent_tokens,
            token_dim=cfg.codebook_embed_dim,
            num_codebooks=cfg.num_codebooks,
            codebook_size=cfg.codebook_size,
            vq_mean=float(cfg.vq_mean),
            vq_std=float(cfg.vq_std),
            model=tok,
            runner=build_runner("tokenizer", tok, "eager", buckets=self.buckets)
            if tok is not None
            else None,
        )

    def _vae_entry(self, name: str, path: Path, load: bool) -> VAEEntry:
        try:
            cfg = read_config(path)
            if cfg.get("_class_name") != "AutoencoderKL":
                raise ValueError("config.json is not a diffusers AutoencoderKL config")
            vae = None
            if load:
                from model.sd_vae import load_sd_vae

                vae = load_sd_vae(path, device=self.device, dtype=self.dtype)
        except (ValueError, OSError, ImportError) as e:
            raise RegistryError(f"SD-VAE {name!r}: {e}") from e
        from model.backends.eager import EagerVAERunner

        return VAEEntry(
            name=name,
            path=path,
            latent_channels=int(cfg.get("latent_channels", 4)),
            downsample=2 ** (len(cfg.get("block_out_channels", (0,) * 4)) - 1),
            scaling_factor=float(cfg.get("scaling_factor") or 0.18215),
            model=vae,
            runner=EagerVAERunner(vae, self.buckets) if vae is not None else None,
        )

    def _generator_entry(self, name: str, path: Path, tok_name: str, load: bool) -> GeneratorEntry:
        if tok_name not in self.tokenizers and tok_name not in self.vaes:
            raise RegistryError(
                f"generator {name!r} pairs with unknown tokenizer or SD-VAE {tok_name!r}"
            )
        try:
            cfg, raw = read_generator_config(path)
            gen = load_generator(path, device=self.device, dtype=self.dtype) if load else None
        except (ValueError, OSError) as e:
            raise RegistryError(f"generator {name!r}: {e}") from e
        if tok_name in self.vaes:
            vae = self.vaes[tok_name]
            if cfg.vae_1d:
                raise RegistryError(
                    f"generator {name!r} samples 1-D tokens; SD-VAE {tok_name!r} decodes 2-D"
                    " latents: pair it with a tokenizer"
                )
            if cfg.in_channels != vae.latent_channels:
                raise RegistryError(
                    f"generator {name!r} samples {cfg.in_channels}-channel latents but SD-VAE"
                    f" {tok_name!r} decodes {vae.latent_channels}"
                )
            vae.latent_sides.add(cfg.input_size)
            family, image_size = "latent-2d", cfg.input_size * vae.downsample
            latent_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
            num_tokens, token_dim = (cfg.input_size // cfg.patch_size) ** 2, cfg.in_channels
        else:
            if not cfg.vae_1d:
                raise RegistryError(
                    f"generator {name!r} is a 2-D model: pair it with an SD-VAE (SOFTVQ_VAES)"
                )
            tok = self.tokenizers[tok_name]
            if (cfg.input_size, cfg.in_channels) != (tok.num_tokens, tok.token_dim):
                raise RegistryError(
                    f"generator {name!r} works on ({cfg.input_size}, {cfg.in_channels}) tokens"
                    f" but tokenizer {tok_name!r} makes ({tok.num_tokens}, {tok.token_dim})"
                )
            family, image_size = "softvq", tok.image_size
            latent_shape = num_tokens, token_dim = (cfg.input_size, cfg.in_channels)
        names = raw.get("class_names")
        if names is not None and not (
            isinstance(names, list)
            and len(names) == cfg.num_classes
            and all(isinstance(x, str) and x for x in names)
            and len({x.lower() for x in names}) == len(names)
        ):
            raise RegistryError(
                f"generator {name!r}: class_names must be {cfg.num_classes} distinct names"
            )
        return GeneratorEntry(
            name=name,
            path=path,
            tokenizer=tok_name,
            class_names=names,
            sampling=sampling_defaults(name, raw.get("sampling")),
            num_classes=cfg.num_classes,
            num_tokens=num_tokens,
            token_dim=token_dim,
            image_size=image_size,
            latent_shape=latent_shape,
            family=family,
            speed_reference=bool(raw.get("speed_reference", False)),
            model=gen,
            runner=build_runner("generator", gen, "eager", buckets=self.buckets)
            if gen is not None
            else None,
        )

    # --- lookup -----------------------------------------------------------------------
    def tokenizer(self, name: str | None) -> TokenizerEntry:
        name = name or self.default_tokenizer
        if name not in self.tokenizers:
            raise UnknownModel("tokenizer", name, list(self.tokenizers))
        return self.tokenizers[name]

    def latent_decoder(self, name: str) -> TokenizerEntry | VAEEntry:
        """What decodes a generator's latents: its tokenizer, or its SD-VAE."""
        if name in self.vaes:
            return self.vaes[name]
        return self.tokenizer(name)

    def generator(self, name: str | None) -> GeneratorEntry:
        name = name or self.default_generator
        if name is None or name not in self.generators:
            raise UnknownModel("generator", str(name), list(self.generators))
        return self.generators[name]

    def info(self) -> dict:
        """What GET /models shows. ``backend`` is the one a runner actually uses (``auto``
        resolves to a concrete backend once weights are loaded)."""
        return {
            "tokenizers": [
                {
                    "name": t.name,
                    "image_size": t.image_size,
                    "num_tokens": t.num_tokens,
                    "token_dim": t.token_dim,
                    "num_codebooks": t.num_codebooks,
                    "codebook_size": t.codebook_size,
                    **self._common(t),
                }
                for t in self.tokenizers.values()
            ],
            "generators": [
                {
                    "name": g.name,
                    "image_size": g.image_size,
                    "num_tokens": g.num_tokens,
                    "token_dim": g.token_dim,
                    **self._common(g),
                    "num_classes": g.num_classes,
                    "class_names": g.class_names,
                    "sampling_defaults": g.sampling,
                    "tokenizer": g.tokenizer,
                    "family": g.family,
                    "latent_shape": list(g.latent_shape),
                    "speed_reference": g.speed_reference,
                    **({"note": SPEED_REFERENCE_NOTE} if g.speed_reference else {}),
                }
                for g in self.generators.values()
            ],
            "vaes": [
                {
                    "name": v.name,
                    "latent_channels": v.latent_channels,
                    "downsample": v.downsample,
                    "scaling_factor": v.scaling_factor,
                    **self._common(v, backend="eager"),
                }
                for v in self.vaes.values()
            ],
        }

    def served(self) -> dict[str, dict[str, str]]:
        """Model name -> how this process runs it (backend, device, dtype): what a worker's
        heartbeat tells the API, whose own registry holds shapes only."""
        entries = [*self.tokenizers.values(), *self.generators.values()]
        served = {e.name: self._common(e) for e in entries}
        return served | {v.name: self._common(v, backend="eager") for v in self.vaes.values()}

    def _common(self, entry, backend: str | None = None) -> dict[str, str]:
        backend = backend or getattr(entry.runner, "backend", None) or self.backend
        return {"backend": backend, "device": str(self.device), "dtype": _dtype_name(self.dtype)}

    def streams(self) -> list[tuple[str, str]]:
        """Every (model, task) this registry can run: each task of the table
        (service/tasks.py) on every model of its family."""
        from .tasks import TASKS

        return [(model, task.name) for task in TASKS.values() for model in task.models(self)]

    # --- warm-up ----------------------------------------------------------------------
    def warmup(self) -> None:
        """Run every batch bucket once per model, so first requests do not pay for
        allocation (and compiled backends build their graphs now)."""
        if not self.loaded:
            raise RuntimeError("warmup needs a registry built with load_weights=True")
        buckets = self.buckets
        with self.lock:
            for t in self.tokenizers.values():
                t.runner.warmup(buckets)
            for g in self.generators.values():
                g.runner.warmup(buckets)
            for v in self.vaes.values():
                v.runner.warmup(buckets, sorted(v.latent_sides))
        self.warm = True
        log.info(
            "warmed up %d tokenizers, %d SD-VAEs, %d generators on buckets %s",
            len(self.tokenizers),
            len(self.vaes),
            len(self.generators),
            buckets,
        )

    # --- the configured backend, proven in the background (service/backend_tuning.py) --
    def start_tuning(self) -> None:
        self.tuner.start()

    def tune_backends(self) -> None:
        self.tuner.run()

    def stop_tuning(self, wait_s: float = 2.0) -> bool:
        return self.tuner.stop(wait_s)

    @property
    def tuned(self) -> threading.Event:
        return self.tuner.done

    def swap_runner(self, kind: str, entry, runner) -> None:
        """Serve ``entry`` on ``runner`` from now on (the caller holds ``lock``) and relabel
        its ``softvq_model_info``."""
        self._unexport_info(kind, entry)
        entry.runner = runner
        self._export_info_one(kind, entry)

    def _labels(self, kind: str, e) -> dict[str, str]:
        return dict(
            model=e.name,
            kind=kind,
            tokens=str(e.num_tokens),
            dim=str(e.token_dim),
            **self._common(e),
        )

    def _export_info_one(self, kind: str, e) -> None:
        metrics.MODEL_INFO.labels(**self._labels(kind, e)).set(1)

    def _unexport_info(self, kind: str, e) -> None:
        try:
            metrics.MODEL_INFO.remove(*self._labels(kind, e).values())
        except KeyError:
            pass

    def _export_info(self) -> None:
        for kind, entries in (("tokenizer", self.tokenizers), ("generator", self.generators)):
            for e in entries.values():
                self._export_info_one(kind, e)
        for g in self.generators.values():
            metrics.GENERATOR_FAMILY.labels(
                model=g.name, family=g.family, speed_reference=str(g.speed_reference).lower()
            ).set(1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


RUN_FIELDS = ("backend", "device", "dtype")


def with_workers(info: dict, workers: list[dict]) -> dict:
    """GET /models seen through the processes that run the models: per model, ``workers``
    (live replicas) and its backend / device / dtype as those replicas report them (several
    values comma-joined when replicas differ; null when none serves it). In Redis mode the
    API's own registry knows shapes only, so its device and backend would say nothing."""
    for entry in [*info["tokenizers"], *info["generators"]]:
        runs = [w["served"][entry["name"]] for w in workers if entry["name"] in w.get("served", {})]
        entry["workers"] = len(runs)
        for field in RUN_FIELDS:
            values = sorted({str(r.get(field)) for r in runs})
            entry[field] = ",".join(values) if values else None
    return info
