"""Training subcommands of ``softvq``: train-teacher, train-tokenizer, train-generator,
train-demo (evaluate-demo: ``evaluate_cli``)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import time
from pathlib import Path

from ..usage import UsageError
from . import evaluate_cli
from .loop import set_threads, training_device


def register(sub) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="train the frozen teacher (our DINOv2 stand-in) for alignment losses (resumable)",
    )
    _common(p)
    p.add_argument("--arch", choices=("vit", "cnn"), default="vit")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=4, help="vit only")
    p.add_argument("--width", type=int, default=96, help="vit width / cnn first-stage channels")
    p.add_argument("--depth", type=int, default=2, help="vit only")
    p.add_argument("--heads", type=int, default=4, help="vit only")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.set_defaults(func=_train_teacher)

    p = sub.add_parser("train-tokenizer", help="train a SoftVQ tokenizer (resumable)")
    _common(p)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="latent tokens L")
    p.add_argument("--token-dim", type=int, default=16, help="token width D")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--codebooks", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.07, help="soft-VQ temperature")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=96, help="ViT width (encoder and decoder)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--grad-weight", type=float, default=0.5, help="weight of the image-gradient (edge) L1 term"
    )
    p.add_argument("--entropy-weight", type=float, default=0.002)
    p.add_argument(
        "--pos-init",
        choices=("random", "sincos"),
        default="sincos",
        help="patch position embeddings at init (random: timm's; sincos learns much faster)",
    )
    p.add_argument("--teacher", default=None, help="teacher directory (softvq train-teacher)")
    p.add_argument(
        "--align-weight",
        type=float,
        default=0.0,
        help="latent-token alignment to the teacher's patch features (SoftVQ's repa; 0: off)",
    )
    p.add_argument("--align-proj-dim", type=int, default=256)
    p.add_argument(
        "--perceptual-weight",
        type=float,
        default=0.0,
        help="distance of the teacher's feature maps, reconstruction vs image (0: off)",
    )
    p.add_argument(
        "--init-from-teacher",
        action="store_true",
        help="start the encoder from a vit teacher of the same shape",
    )
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("train-generator", help="train a SiT on a tokenizer's latents (resumable)")
    _common(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument(
        "--time-dist",
        choices=("lognormal", "uniform"),
        default="lognormal",
        help="training times: sigmoid of a standard normal, or uniform",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=20_000,
        help="built-in set: images encoded once for training",
    )
    p.add_argument("--teacher", default=None, help="teacher directory (softvq train-teacher)")
    p.add_argument(
        "--repa-weight",
        type=float,
        default=0.0,
        help="REPA: align a block's hidden states to the teacher's features (0: off)",
    )
    p.add_argument("--repa-block", type=int, default=0, help="after which block (0: depth // 2)")
    p.add_argument(
        "--class-prior-rank",
        type=int,
        default=0,
        help="sample from a Gaussian per class of this rank instead of N(0, I) (0: off)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this generator directory (fine-tune or train longer): its width,"
        " depth and heads replace --hidden/--depth/--heads",
    )
    p.set_defaults(func=_train_generator)

    p = sub.add_parser(
        "train-demo",
        help="retrain every bundled demo model from scratch, or train the same recipe on your"
        " own folder of class sub-folders (--data)",
    )
    p.add_argument("--work-dir", default="runs/demo", help="checkpoints and results (resumable)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="where finished models are copied (default: the bundled demo_weights; required"
        " with --data FOLDER), ready for softvq serve --models OUT_DIR",
    )
    p.add_argument(
        "--data",
        default="shapes",
        help='"shapes" (the built-in set the demo models learn) or a folder of class'
        " sub-folders of images: the same recipe, teacher and alignment included, on them"
        " (every 10th image of a class held out for evaluate-demo)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="pixels per side the images are resized and centre-cropped to (a multiple of 16;"
        " default 32, the recipe's: 64 costs about four times as much per step)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every step count (e.g. 0.01 for a smoke run)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cores to use (default: all this process may use), divided among the processes "
        "training side by side; a process that finishes hands its share to the others",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one process, stage after stage (default: teacher / judge, then the two chains "
        "side by side, dividing the cores)",
    )
    _device_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train_demo)

    evaluate_cli.register(sub)


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default auto: the GPU when torch sees one, else the CPU)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="shapes",
        help='"shapes" (built-in procedural set) or a folder of class sub-folders',
    )
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default=None, help="checkpoint file (default: <out>.ckpt.pt)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: <= 2)")
    _device_arg(p)
    p.add_argument("--quiet", action="store_true")


def _check_data(data: str) -> None:
    """A folder is refused in one line, before any training: missing, without class
    sub-folders or images, or holding a file that is not a readable image."""
    from .data import ImageFolderSet

    if data == "shapes":
        return
    if not Path(data).is_dir():
        raise UsageError(
            f'{data}: not a directory (--data is "shapes" or a folder of class sub-folders)'
        )
    try:
        bad = ImageFolderSet(data).unreadable()
    except ValueError as e:
        raise UsageError(str(e)) from e
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UsageError(
            f"{len(bad)} file(s) of {data} are not readable images; remove or fix them: "
            + "; ".join(bad[:3])
            + more
        )


def _train_teacher(args) -> int:
    from .teacher import TeacherTrainConfig, train_teacher

    _check_data(args.data)
    set_threads(args.threads)
    cfg = TeacherTrainConfig(
        out=args.out,
        data=args.data,
        arch=args.arch,
        image_size=args.image_size,
        patch_size=args.patch_size,
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ckpt=args.ckpt,
        ckpt_every=args.ckpt_every,
    )
    train_teacher(cfg, quiet=args.quiet, device=training_device(args.device))
    return 0


def _check_teacher(teacher, needed: bool) -> None:
    if needed and not teacher:
        raise UsageError(
            "--align-weight / --perceptual-weight / --init-from-teacher / "
            "--repa-weight need --teacher DIR (softvq train-teacher)"
        )
    if teacher and not (Path(teacher) / "config.json").is_file():
        raise UsageError(f"--teacher {teacher}: no config.json there")


def _train_tokenizer(args) -> int:
    from .tokenizer_trainer import TokenizerTrainConfig, train_tokenizer

    _check_data(args.data)
    _check_teacher(
        args.teacher, bool(args.align_weight or args.perceptual_weight or args.init_from_teacher)
    )
    set_threads(args.threads)
    vit = {"embed_dim": args.width, "depth": args.depth, "num_heads": args.heads}
    cfg = TokenizerTrainConfig(
        out=args.out,
        data=args.data,
        image_size=args.image_size,
        num_tokens=args.tokens,
        token_dim=args.token_dim,
        codebook_size=args.codebook_size,
        num_codebooks=args.codebooks,
        tau=args.tau,
        patch_size=args.patch_size,
        enc=dict(vit),
        dec=dict(vit),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        grad_weight=args.grad_weight,
        entropy_weight=args.entropy_weight,
        pos_init=args.pos_init,
        teacher=args.teacher,
        align_weight=args.align_weight,
        align_proj_dim=args.align_proj_dim,
        perceptual_weight=args.perceptual_weight,
        init_from_teacher=args.init_from_teacher,
        seed=args.seed,
        ckpt=args.ckpt,
        ckpt_every=args.ckpt_every,
    )
    train_tokenizer(cfg, quiet=args.quiet, device=training_device(args.device))
    return 0


def _train_generator(args) -> int:

    from ..loading import CheckpointError
    from .generator_trainer import GeneratorTrainConfig, train_generator

    _check_data(args.data)
    if not (Path(args.tokenizer) / "config.json").is_file():
        raise UsageError(f"--tokenizer {args.tokenizer}: no config.json there")
    _check_teacher(args.teacher, bool(args.repa_weight))
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        raise UsageError(f"--init-from {args.init_from}: no config.json there")
    set_threads(args.threads)
    cfg = GeneratorTrainConfig(
        out=args.out,
        tokenizer=args.tokenizer,
        data=args.data,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        class_dropout=args.class_dropout,
        time_dist=args.time_dist,
        train_size=args.train_size,
        teacher=args.teacher,
        repa_weight=args.repa_weight,
        repa_block=args.repa_block,
        class_prior_rank=args.class_prior_rank,
        init_from=args.init_from,
        seed=args.seed,
        ckpt=args.ckpt,
        ckpt_every=args.ckpt_every,
    )
    try:
        train_generator(cfg, quiet=args.quiet, device=training_device(args.device))
    except CheckpointError as e:  # e.g. --init-from's model does not fit these latents
        raise UsageError(str(e)) from e
    return 0


def _train_demo(args) -> int:
    from .. import demo
    from .recipe import IMAGE_SIZE, WALL_CLOCK, TrainingData, claim_work_dir, train_demo

    set_threads(args.threads)
    device = str(training_device(args.device))
    image_size = args.image_size or IMAGE_SIZE
    if image_size < 32 or image_size % 16:
        raise UsageError(f"--image-size must be a multiple of 16, at least 32 (got {image_size})")
    if args.data != "shapes" and not args.out_dir:
        raise UsageError(
            "--data FOLDER trains models on your images: give --out-dir (the bundled demo"
            " models are not replaced)"
        )
    _check_data(args.data)
    out_dir = Path(args.out_dir) if args.out_dir else demo.DEMO_WEIGHTS_DIR
    on = TrainingData(args.data, image_size)
    try:  # a work directory that holds a run on other data is refused here, in one line
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        claim_work_dir(Path(args.work_dir), on)
    except ValueError as e:
        raise UsageError(str(e)) from e
    # SIGTERM (kill, a container or service stop) unwinds like Ctrl-C: the stages are stopped
    # and the run's wall time is written, ready for the next run to resume.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    t0 = time.time()
    stopped = None
    try:
        finished = train_demo(
            Path(args.work_dir),
            scale=args.scale,
            quiet=args.quiet,
            parallel=not args.sequential,
            cores=args.threads,
            device=device,
            on=on,
        )
    except KeyboardInterrupt:
        stopped = 130
    except SystemExit as e:
        stopped = e.code
    wall = json.loads((Path(args.work_dir) / WALL_CLOCK).read_text())
    so_far = f"{wall['seconds'] / 60:.1f} min over {wall['runs']} run(s) in {args.work_dir}"
    if stopped is not None:
        print(
            f"\ntrain-demo: stopped after {(time.time() - t0) / 60:.1f} min ({so_far}); "
            "the same command resumes it"
        )
        return stopped
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, path in finished.items():
        dest = out_dir / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(path, dest)
    print(
        f"train-demo: done on {device} in {(time.time() - t0) / 60:.1f} min ({so_far}); "
        f"models in {out_dir}"
    )
    if args.data == "shapes":
        print(f"read them against the bars: softvq evaluate-demo --weights-dir {out_dir}")
    else:
        print(f"measure them on the held-out images: softvq evaluate-demo --weights-dir {out_dir}")
        print(f"serve them: softvq serve --models {out_dir}")
    return 0


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)
