"""``softvq evaluate-demo``: the quality numbers and grid of a train-demo run's models (the
bundled ones by default), read against issue #14's bars on the built-in set, or on a folder
run's held-out images."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..usage import UsageError
from .loop import set_threads


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate-demo",
        help="quality numbers and grid of the demo models (the built-in set's against issue "
        "#14's bars: exit status 1 when a pair misses one; a folder run's on its held-out "
        "images)",
    )
    p.add_argument(
        "--weights-dir",
        default=None,
        help="default: the bundled demo_weights; or a train-demo --out-dir",
    )
    p.add_argument(
        "--data",
        default=None,
        help="the held-out images: default what the models were trained on (training.json): "
        '"shapes" or the folder, whose held-out split (every 10th image of a class) no stage '
        "trained on",
    )
    p.add_argument("--psnr-images", type=int, default=500)
    p.add_argument("--per-class", type=int, default=20, help="generated images per class")
    # Left out: each generator's own defaults (config.json "sampling"), i.e. what /generate
    # does for a request that names no settings.
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--sampler", default=None, help="default: the model's")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--grid", default=None, help="write a PNG grid (a row per class) here")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--noised",
        action="store_true",
        help="also judge generation started from real latents noised to t = 0 ... 1",
    )
    p.add_argument(
        "--outlines",
        action="store_true",
        help="also fit each generated image (and as many reconstructions) with its class's "
        "clean shape and report the outlines' IoU per class",
    )
    p.set_defaults(func=_evaluate_demo)


def settings_for(gen_dir: Path, args=None):
    """The generator's sampling defaults (config.json "sampling", as /generate uses them),
    with what the command line (``args``, when given) names instead."""
    from ..loading import read_config
    from ..sampling import sampling_settings
    from .evaluate import GenerationSettings

    d = sampling_settings(read_config(gen_dir).get("sampling"))
    chosen = {}
    for key in ("steps", "sampler", "cfg_scale"):
        named = getattr(args, key, None)
        chosen[key] = d[key] if named is None else named
    return GenerationSettings(**chosen, guidance_interval=tuple(d["guidance_interval"]))


def _evaluated_data(root: Path, data: str | None) -> tuple[str, list[str]]:
    """(what to measure the models in ``root`` on, their class names): ``data`` or what
    the generators trained on, refused in one line when the generators, the judge and the
    data disagree, or when a folder holds no images out."""
    from .. import demo
    from ..loading import read_config
    from .data import CLASSES, ImageFolderSet

    judge_dir = root / demo.JUDGE_CLASSIFIER
    if not (judge_dir / "config.json").is_file():
        raise UsageError(
            f"{root}: no {demo.JUDGE_CLASSIFIER} (train-demo writes it beside the models)"
        )
    classes = None
    for gen_name in demo.DEMO_GENERATORS:
        gen_dir = root / gen_name
        if not (gen_dir / "config.json").is_file():
            raise UsageError(f"{root}: no {gen_name} (train-demo writes it)")
        names = read_config(gen_dir).get("class_names") or list(CLASSES)
        if classes is not None and names != classes:
            raise UsageError(f"{root}: the generators were trained on different classes")
        classes = names
        if data is None:  # the folder (absolute) or "shapes", as training.json records it
            meta = _training_json(gen_dir).get("data_set", {})
            data = meta.get("path") or "shapes"
    # A judge without a class list is one of the built-in set (the bundled one predates it).
    judge_classes = _training_json(judge_dir).get("classes") or list(CLASSES)
    if judge_classes != classes:
        raise UsageError(
            f"{judge_dir} names other classes ({', '.join(judge_classes)}) than the generators"
            f" ({', '.join(classes)}): train-demo writes a judge for the data it trains on"
        )
    if data == "shapes":
        if classes != list(CLASSES):
            raise UsageError(
                f"{root}: trained on other classes ({', '.join(classes)}) than the built-in set;"
                " give --data FOLDER, the folder they were trained on"
            )
        return data, classes
    try:
        held_out = ImageFolderSet(data, split="held_out")
    except ValueError as e:
        raise UsageError(f"{e} (--data)") from e
    if list(held_out.classes) != classes:
        raise UsageError(
            f"{data}: its classes ({', '.join(held_out.classes)}) are not the models' "
            f"({', '.join(classes)})"
        )
    return data, classes


def _training_json(model_dir: Path) -> dict:
    path = model_dir / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _evaluate_demo(args) -> int:
    from .. import demo
    from ..loading import load_generator, load_tokenizer
    from .classifier import load_judge
    from .data import held_out_set
    from .evaluate import (
        DEMO_BARS,
        GenerationSettings,
        accuracy_from_noised_latents,
        class_grid,
        evaluate_pair,
        missed_bars,
        outline_quality,
    )

    set_threads(args.threads)
    root = Path(args.weights_dir) if args.weights_dir else demo.DEMO_WEIGHTS_DIR
    data, classes = _evaluated_data(root, args.data)
    built_in = data == "shapes"
    if args.outlines and not built_in:
        raise UsageError("--outlines fits the built-in set's shapes: not for a folder's models")
    judge = load_judge(root / demo.JUDGE_CLASSIFIER)
    results, grids = {}, []
    real_sets = {}  # a folder's held-out images, opened (and decoded) once per image size
    if not built_in:
        ceiling = _training_json(root / demo.JUDGE_CLASSIFIER).get("held_out_accuracy")
        print(
            f"on {data}'s held-out images (every 10th of a class, trained on by no stage); the"
            f" judge names {ceiling:.1%} of them (the ceiling of the judged shares below)"
            if ceiling is not None
            else f"on {data}'s held-out images"
        )
    for gen_name, tok_name in demo.DEMO_GENERATORS.items():
        t0 = time.time()
        tok, gen = load_tokenizer(root / tok_name), load_generator(root / gen_name)
        settings = settings_for(root / gen_name, args)
        if not built_in and tok.image_size not in real_sets:
            real_sets[tok.image_size] = held_out_set(data, tok.image_size, 0)
        real = real_sets.get(tok.image_size)
        r = evaluate_pair(tok, gen, judge, args.psnr_images, args.per_class, settings, real=real)
        images, labels = r.pop("_images"), r.pop("_labels")
        grids.append(images)
        r["seconds"] = round(time.time() - t0, 1)
        results[f"{tok_name} + {gen_name}"] = r
        print(
            f"{tok_name}: PSNR {r['psnr_mean']:.2f} dB on {r['psnr_images']} held-out images "
            f"(min {r['psnr_min']:.2f}), judged reconstructions "
            f"{r['reconstruction_accuracy']:.3f} | {gen_name}: class accuracy {r['accuracy']:.3f} "
            f"with cfg {settings.cfg_scale}, {settings.steps} {settings.sampler} steps | "
            f"diversity ratio {r['diversity_ratio_mean']:.3f} "
            f"(min {r['diversity_ratio_min']:.3f})"
        )
        print(
            "  generated, judged per class: "
            + ", ".join(f"{name} {a:.2f}" for name, a in zip(classes, r["accuracy_per_class"]))
        )
        if built_in:
            r["missed_bars"] = missed_bars(r, DEMO_BARS[tok_name])
            print(
                "  below the bar: " + "; ".join(r["missed_bars"])
                if r["missed_bars"]
                else "  every bar met (issue #14)"
            )
        if args.noised:
            fast = GenerationSettings(
                steps=settings.steps, sampler="euler", cfg_scale=settings.cfg_scale
            )
            acc = accuracy_from_noised_latents(tok, gen, judge, settings=fast, real=real)
            r["accuracy_from_noised_latents"] = acc
            print(
                "  judged accuracy from real latents noised to t: "
                + ", ".join(f"t={t:g} {a:.3f}" for t, a in acc.items())
                + " (t=0: reconstructions, t=1: generation)"
            )
        if args.outlines:
            r["outline_iou"] = outline_quality(tok, images, labels)
            for what, per_class in r["outline_iou"].items():
                print(
                    f"  outline IoU, {what} (median per class): "
                    + ", ".join(f"{classes[c]} {v:.2f}" for c, v in enumerate(per_class))
                )
    if args.grid:
        # The default generator's samples: a row per class, 10 per row.
        class_grid(
            grids[list(demo.DEMO_GENERATORS).index(demo.DEFAULT_GENERATOR)],
            args.per_class,
            columns=min(10, args.per_class),
        ).save(args.grid)
        print(f"grid: {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    # A retrained pair that misses a bar fails the command, so a script can stop before
    # copying it over the bundle. A folder's models have no bars: the numbers are the answer.
    return 1 if any(r.get("missed_bars") for r in results.values()) else 0
