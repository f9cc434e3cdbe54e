"""Your own images, end to end (issue #14: "the same three-stage command works on a user's
folder of class sub-folders"): ``softvq train-demo --data FOLDER --out-dir DIR`` runs the demo
recipe (judge, teacher, aligned tokenizers, generators with REPA) on the folder's training
split, ``softvq evaluate-demo --weights-dir DIR`` measures what it wrote on the folder's
held-out split, and ``softvq serve --models DIR`` serves it, with the folder's class names.

Real processes, the real recipe at a tiny scale (a few steps a stage: the plumbing, not the
quality; docs/DEMO_MODELS.md has a run at a tenth of the recipe on a folder)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from model import demo
from service.cli import main
from tests.test_api import decode_png
from tests.test_serve_uvicorn import serve_process

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("bar", "cross", "disc")  # sorted: class ids follow the sub-folders' sorted names


def image_folder(root: Path, per_class: int = 20) -> Path:
    """Class sub-folders of small drawn shapes, 48 x 40 (not square: resized and cropped).
    20 a class: the 10th and 20th are held out, two a class to measure diversity on."""
    rng = random.Random(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            bg, fg = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
            im = Image.new("RGB", (48, 40), bg)
            draw, r = ImageDraw.Draw(im), rng.randint(8, 14)
            if name == "disc":
                draw.ellipse([24 - r, 20 - r, 24 + r, 20 + r], fill=fg)
            else:
                draw.rectangle([24 - r, 17, 24 + r, 23], fill=fg)
                if name == "cross":
                    draw.rectangle([21, 20 - r, 27, 20 + r], fill=fg)
            im.save(root / name / f"{i}.png")
    return root


def bundled_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(demo.DEMO_WEIGHTS_DIR.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_demo_on_a_folder_then_serve_what_it_wrote(tmp_path):
    data, work, out = image_folder(tmp_path / "data"), tmp_path / "work", tmp_path / "models"
    before = bundled_digest()
    cmd = [sys.executable, "-m", "service.cli", "train-demo", "--data", str(data)]
    cmd += ["--work-dir", str(work), "--out-dir", str(out), "--scale", "0.0005"]
    cmd += ["--sequential", "--threads", "1", "--quiet"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"serve them: softvq serve --models {out}" in run.stdout
    assert f"softvq evaluate-demo --weights-dir {out}" in run.stdout
    assert bundled_digest() == before  # the bundled demo models are not replaced
    # The four models of the recipe and a judge of the folder's classes.
    assert sorted(p.name for p in out.iterdir()) == [
        "judge-classifier",
        "sit-demo-32",
        "sit-demo-64",
        "softvq-demo-32",
        "softvq-demo-64",
    ]
    teacher = json.loads((work / "teacher" / "training.json").read_text())
    assert teacher["data_set"] == {"name": "folder", "path": str(data.resolve())}
    assert 0.0 <= teacher["held_out_accuracy"] <= 1.0
    judge = json.loads((out / "judge-classifier" / "training.json").read_text())
    assert judge["classes"] == list(CLASSES) and judge["held_out_images"] == 6
    for name in ("softvq-demo-64", "sit-demo-64"):
        trained = json.loads((out / name / "training.json").read_text())
        assert trained["trained_with"]["data"] == str(data)
        assert trained["trained_with"]["teacher"]  # the alignment losses are on, as in the recipe
    assert json.loads((out / "sit-demo-64" / "config.json").read_text())["class_names"] == list(
        CLASSES
    )
    # evaluate-demo finds the folder in training.json and measures on its held-out split.
    numbers = tmp_path / "numbers.json"
    judged = subprocess.run(
        [sys.executable, "-m", "service.cli", "evaluate-demo", "--weights-dir", str(out)]
        + ["--per-class", "2", "--json", str(numbers), "--steps", "2", "--noised"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert judged.returncode == 0, judged.stdout[-2000:] + judged.stderr[-2000:]
    assert f"on {data.resolve()}'s held-out images" in judged.stdout
    assert "generated, judged per class: bar" in judged.stdout
    for pair, r in json.loads(numbers.read_text()).items():
        assert r["psnr_images"] == 6 and r["generated_images"] == 6, pair
        assert sorted(r["diversity_per_class"]) == ["0", "1", "2"], pair
        assert 0.0 <= r["reconstruction_accuracy"] <= 1.0 and "missed_bars" not in r, pair
        assert sorted(r["accuracy_from_noised_latents"]) == ["0.0", "0.3", "0.6", "0.8", "1.0"]

    def refused(*args: str) -> str:
        cmd = [sys.executable, "-m", "service.cli", "evaluate-demo", "--weights-dir", str(out)]
        r = subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        return r.stderr

    assert "give --data FOLDER" in refused("--data", "shapes")
    assert "fits the built-in set's shapes" in refused("--outlines")
    few = image_folder(tmp_path / "few", per_class=3)
    assert "no held-out images" in refused("--data", str(few))
    # A judge of other classes (here the bundled one, of the built-in set) is refused too.
    shutil.rmtree(out / "judge-classifier")
    shutil.copytree(demo.demo_path(demo.JUDGE_CLASSIFIER), out / "judge-classifier")
    assert "names other classes (circle, square" in refused()

    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
    env.update(HOME=str(tmp_path / "home"), SOFTVQ_BACKEND="eager")
    with serve_process(env, tmp_path, ("--models", str(out))) as (base, _):
        models = httpx.get(f"{base}/models").json()
        assert {m["name"] for m in models["tokenizers"]} == {"softvq-demo-32", "softvq-demo-64"}
        gens = {g["name"]: g for g in models["generators"]}
        assert gens["sit-demo-64"]["class_names"] == list(CLASSES)
        r = httpx.post(
            f"{base}/generate",
            json={"class_labels": ["disc", "bar", "cross", 0], "seed": 0, "steps": 4},
            headers={"Accept": "image/png"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.headers["X-Class-Labels"] == "2,0,1,0"
        assert decode_png(r.content).shape == (32 + 4, 4 * (32 + 2) + 2, 3)  # a 2 px gutter
        r = httpx.post(f"{base}/generate", json={"class_labels": ["star"]}, timeout=30)
        assert r.status_code == 422 and r.json()["error"] == "invalid_class"
        assert "bar, cross, disc" in r.json()["message"]


def test_train_demo_refuses_a_folder_run_it_cannot_do_in_one_line(tmp_path, capsys):
    data = image_folder(tmp_path / "data", per_class=1)
    work = tmp_path / "work"

    def refused(*args: str) -> str:
        assert main(["train-demo", "--quiet", "--work-dir", str(work), *args]) == 2
        return capsys.readouterr().err

    assert "give --out-dir" in refused("--data", str(data))
    assert "not a directory" in refused("--data", str(tmp_path / "nope"), "--out-dir", "o")
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in refused("--data", str(tmp_path / "empty"), "--out-dir", "o")
    assert "multiple of 16" in refused("--data", str(data), "--out-dir", "o", "--image-size", "40")
    (data / "new-class").mkdir()
    assert "without images: new-class" in refused("--data", str(data), "--out-dir", "o")
    (data / "new-class").rmdir()
    # A file that is not a readable image is named before any training (not hours in); a
    # Mac's hidden "._" resource fork is not an image of the folder and is passed over.
    (data / "bar" / "._0.png").write_bytes(b"\x00\x05\x16\x07 a resource fork")
    (data / "bar" / "notes.png").write_text("not an image")
    (data / "disc" / "cut.png").write_bytes((data / "disc" / "0.png").read_bytes()[:60])
    err = refused("--data", str(data), "--out-dir", str(tmp_path / "o"))
    assert "2 file(s) of" in err and "notes.png" in err and "cut.png" in err, err
    for stage in ("train-teacher", "train-tokenizer"):
        assert main([stage, "--quiet", "--data", str(data), "--out", str(tmp_path / "s")]) == 2
        assert "notes.png" in capsys.readouterr().err
    (data / "bar" / "notes.png").unlink()
    (data / "disc" / "cut.png").unlink()
    # A work directory is tied to its data: resuming it on other images is refused.
    work.mkdir()
    (work / "trained_on.json").write_text(json.dumps({"data": "shapes", "image_size": 32}))
    err = refused("--data", str(data), "--out-dir", str(tmp_path / "o"))
    assert "holds a run on shapes at 32 px" in err and "another --work-dir" in err
    assert not (tmp_path / "o").exists()


def test_a_folder_set_takes_its_classes_in_turns(tmp_path):
    """The first images of a folder set hold every class (a tokenizer's latent statistics are
    measured on the first 2000), also when the classes have different sizes."""
    from model.training.data import ImageFolderSet

    for name, count in {"a": 3, "b": 1, "c": 2}.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    ds = ImageFolderSet(tmp_path, image_size=8)
    assert ds.classes == ("a", "b", "c")
    assert [ds.label(i) for i in range(len(ds))] == [0, 1, 2, 0, 2, 0]
    assert [f.name for f, _ in ds.files] == ["0.png", "0.png", "0.png", "1.png", "1.png", "2.png"]
