"""Which models a process serves: the settings' model maps and models directory, the compare
profile's random-weight speed references (service/compare.py), or, with nothing configured,
the bundled demo weights found on disk. Names and paths only; service/registry.py loads them.
"""

from __future__ import annotations

from pathlib import Path


class RegistryError(ValueError):
    """The configured models cannot be served (bad path, incompatible pair, no models)."""


def configured_models(settings):
    """-> ({tokenizer: path}, {vae: path}, {generator: (path, tokenizer)}, (default tok,
    default gen)). The compare profile (``SOFTVQ_COMPARE``) adds its random-weight models;
    empty settings fall back to the bundled demo weights that exist on disk."""
    toks, vaes = dict(settings.tokenizers), dict(settings.vaes)
    gens = {n: (s.path, s.tokenizer) for n, s in settings.generators.items()}
    defaults = (settings.default_tokenizer, settings.default_generator)
    if settings.models_dir:
        found_toks, found_gens = models_in(settings.resolve(settings.models_dir))
        clash = (set(found_toks) & set(toks)) | (set(found_gens) & set(gens))
        if clash:
            raise RegistryError(
                f"{settings.models_dir} holds models named as configured ones: {sorted(clash)}"
            )
        toks, gens = toks | found_toks, gens | found_gens
        defaults = _demo_defaults(defaults, toks, gens)
    if settings.compare:
        from .compare import compare_models

        ref = compare_models(settings.compare, settings.cache_dir)
        clash = (set(ref.tokenizers) & set(toks)) | (set(ref.generators) & set(gens))
        if clash:
            raise RegistryError(f"the compare profile's model names are taken: {sorted(clash)}")
        toks, vaes = toks | ref.tokenizers, vaes | ref.vaes
        gens = gens | ref.generators
        defaults = (defaults[0] or ref.default_tokenizer, defaults[1] or ref.default_generator)
    if toks or vaes:
        if not gens and not toks:
            raise RegistryError("SD-VAEs are configured but no generator or tokenizer")
        return toks, vaes, gens, defaults
    if settings.generators:
        raise RegistryError("generators are configured but no tokenizers")
    from model import demo

    try:
        toks, gens = models_in(demo.DEMO_WEIGHTS_DIR)
    except RegistryError as e:
        raise RegistryError(
            "no models configured (SOFTVQ_TOKENIZERS, SOFTVQ_MODELS_DIR) and no bundled demo"
            f" weights found ({e})"
        ) from None
    return toks, {}, gens, _demo_defaults(defaults, toks, gens)


def _demo_defaults(defaults, toks, gens):
    """The configured defaults, else the demo's names where those are served (a train-demo
    output directory has them too); None leaves the choice to the registry (the first)."""
    from model import demo

    tok = defaults[0] or (demo.DEFAULT_TOKENIZER if demo.DEFAULT_TOKENIZER in toks else None)
    gen = defaults[1] or (demo.DEFAULT_GENERATOR if demo.DEFAULT_GENERATOR in gens else None)
    return tok, gen


def models_in(directory: Path) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """({tokenizer: path}, {generator: (path, tokenizer)}) of the model directories in
    ``directory`` (config.json + weights), named by their directories. Their
    config.json tells them apart: a tokenizer's has ``num_latent_tokens``, a generator's
    names the ``tokenizer`` it samples for, which must be in ``directory`` too. Anything else
    there (the judge classifier, a file) is not served."""
    from model.loading import CheckpointError, read_config, weights_file

    if not directory.is_dir():
        raise RegistryError(f"models directory {directory}: not a directory")
    toks: dict[str, str] = {}
    pairs: dict[str, tuple[str, str]] = {}
    for sub in sorted(p for p in directory.iterdir() if (p / "config.json").is_file()):
        try:
            config = read_config(sub)
        except (CheckpointError, OSError) as e:
            raise RegistryError(str(e)) from e
        if not isinstance(config, dict):
            continue
        if "num_latent_tokens" in config:
            toks[sub.name] = str(sub)
        elif isinstance(config.get("tokenizer"), str) and "hidden_size" in config:
            pairs[sub.name] = (str(sub), config["tokenizer"])
        else:
            continue
        try:  # a model directory without its weights: said now, not at load time
            weights_file(sub)
        except CheckpointError as e:
            raise RegistryError(str(e)) from e
    if not toks:
        raise RegistryError(f"models directory {directory}: no tokenizer in it")
    for name, (_, tok) in pairs.items():
        if tok not in toks:
            raise RegistryError(
                f"generator {name} samples for tokenizer {tok!r}, which is not in {directory}"
            )
    return toks, pairs
