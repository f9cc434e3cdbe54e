"""Which models a process serves: the settings' model maps, the compare profile's
random-weight speed references (service/compare.py), or, with nothing configured, the bundled
demo weights found on disk. Names and paths only; service/registry.py loads them.
"""

from __future__ import annotations


class RegistryError(ValueError):
    """The configured models cannot be served (bad path, incompatible pair, no models)."""


def configured_models(settings):
    """-> ({tokenizer: path}, {vae: path}, {generator: (path, tokenizer)}, (default tok,
    default gen)). The compare profile (``SOFTVQ_COMPARE``) adds its random-weight models;
    empty settings fall back to the bundled demo weights that exist on disk."""
    toks, vaes = dict(settings.tokenizers), dict(settings.vaes)
    gens = {n: (s.path, s.tokenizer) for n, s in settings.generators.items()}
    defaults = (settings.default_tokenizer, settings.default_generator)
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

    toks = {n: str(demo.demo_path(n)) for n in demo.DEMO_TOKENIZERS if demo.demo_available(n)}
    gens = {
        n: (str(demo.demo_path(n)), t)
        for n, t in demo.DEMO_GENERATORS.items()
        if t in toks and demo.demo_available(n)
    }
    if not toks:
        raise RegistryError(
            "no models configured (SOFTVQ_TOKENIZERS) and no bundled demo weights found in "
            f"{demo.DEMO_WEIGHTS_DIR}"
        )
    default_tok = settings.default_tokenizer or (
        demo.DEFAULT_TOKENIZER if demo.DEFAULT_TOKENIZER in toks else None
    )
    default_gen = settings.default_generator or (
        demo.DEFAULT_GENERATOR if demo.DEFAULT_GENERATOR in gens else None
    )
    return toks, {}, gens, (default_tok, default_gen)
