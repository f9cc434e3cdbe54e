"""``softvq tokenize | reconstruct | generate``: run the models directly, no server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model.usage import UsageError


def _tokenizer_dir(arg: str | None) -> str:
    from model.demo import DEFAULT_TOKENIZER, demo_available, demo_path

    if arg:
        return arg
    if not demo_available(DEFAULT_TOKENIZER):
        raise UsageError("no bundled demo tokenizer found; pass --tokenizer DIR")
    return str(demo_path(DEFAULT_TOKENIZER))


def _generator_dir(arg: str | None) -> str:
    from model.demo import DEFAULT_GENERATOR, demo_available, demo_path

    if arg:
        return arg
    if not demo_available(DEFAULT_GENERATOR):
        raise UsageError("no bundled demo generator found; pass --generator DIR")
    return str(demo_path(DEFAULT_GENERATOR))


def _load_tokenizer(args):
    import model

    try:
        return model.load_tokenizer(_tokenizer_dir(args.tokenizer), device=args.device)
    except (model.CheckpointError, OSError) as e:
        raise UsageError(f"cannot load tokenizer: {e}") from None


def _load_generator(args):
    import model

    try:
        return model.load_generator(_generator_dir(args.generator), device=args.device)
    except (model.CheckpointError, OSError) as e:
        raise UsageError(f"cannot load generator: {e}") from None


def _read_image(path: str, size: int):
    from PIL import UnidentifiedImageError

    from model.images import load_image

    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return load_image(path, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def cmd_tokenize(args) -> int:
    import torch

    tok = _load_tokenizer(args)
    images = torch.stack([_read_image(p, tok.image_size) for p in args.images])
    with torch.inference_mode():
        tokens, indices = tok.encode(images, return_indices=True)
    if args.output:
        from safetensors.torch import save_file

        save_file(
            {"tokens": tokens.float().contiguous(), "indices": indices.contiguous()}, args.output
        )
        print(f"wrote tokens {tuple(tokens.shape)} to {args.output}")
    else:
        json.dump(
            {
                "shape": list(tokens.shape),
                "tokens": tokens.float().tolist(),
                "indices": indices.tolist(),
            },
            sys.stdout,
        )
        print()
    return 0


def cmd_reconstruct(args) -> int:
    import torch

    from model.images import psnr, to_pil

    tok = _load_tokenizer(args)
    image = _read_image(args.image, tok.image_size)[None]
    with torch.inference_mode():
        rec = tok.decode(tok.encode(image))
    _save(to_pil(rec)[0], args.output)
    print(f"wrote {args.output} (PSNR {psnr(rec, image)[0]:.2f} dB)")
    return 0


def _load_vae(path: str, device: str):
    try:
        from model.sd_vae import load_sd_vae

        return load_sd_vae(path, device=device)
    except (ImportError, ValueError, OSError) as e:
        raise UsageError(f"cannot load SD-VAE: {e}") from None


def cmd_generate(args) -> int:
    import model
    from model.images import make_grid, to_pil

    gen = _load_generator(args)
    # A 2-D generator (SiT/2) decodes through an SD-VAE, a 1-D one through its tokenizer.
    tok = _load_vae(args.vae, args.device) if args.vae else _load_tokenizer(args)
    labels = args.class_ids
    seeds = [args.seed + i for i in range(len(labels))]
    try:
        images = model.generate(
            tok,
            gen,
            labels,
            seeds,
            steps=args.steps,
            sampler=args.sampler,
            cfg_scale=args.cfg_scale,
            guidance_interval=(args.guidance_low, args.guidance_high),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    pics = to_pil(images)
    _save(pics[0] if len(pics) == 1 else make_grid(pics), args.output)
    print(f"wrote {args.output} (classes {labels}, seeds {seeds})")
    return 0


def _save(img, path: str) -> None:
    try:
        img.save(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot write {path}: {e}") from None


def register(sub) -> None:
    def common(p, generator: bool = False):
        p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: demo)")
        if generator:
            p.add_argument("--generator", metavar="DIR", help="generator directory (default: demo)")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    p = sub.add_parser("tokenize", help="image(s) -> tokens (JSON on stdout, or -o .safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", help="write tokens and indices to this .safetensors file")
    common(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("reconstruct", help="image -> tokens -> image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", default="reconstruction.png")
    common(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("generate", help="class-conditional image(s) (several classes -> a grid)")
    p.add_argument("--class", dest="class_ids", type=int, nargs="+", default=[0], metavar="ID")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="euler", choices=["euler", "heun", "euler-maruyama"])
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("-o", "--output", default="generated.png")
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="SD-VAE directory (diffusers AutoencoderKL) decoding a 2-D generator's latents,"
        " instead of --tokenizer",
    )
    common(p, generator=True)
    p.set_defaults(func=cmd_generate)
