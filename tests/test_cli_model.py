"""``softvq tokenize | reconstruct | generate`` as a user runs them (real subprocesses)."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import model
from model.images import load_image


def softvq(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "pic.png"
    img = Image.new("RGB", (48, 40), (200, 30, 60))
    img.paste((20, 200, 90), (10, 10, 30, 30))
    img.save(p)
    return p


def test_tokenize_matches_the_model(tiny_model_dirs, picture):
    out = softvq("tokenize", picture, "--tokenizer", tiny_model_dirs["tokenizer"])
    result = json.loads(out.stdout)
    assert result["shape"] == [1, 8, 8]
    tok = model.load_tokenizer(tiny_model_dirs["tokenizer"])
    with torch.no_grad():
        tokens, indices = tok.encode(load_image(str(picture), 32)[None], return_indices=True)
    assert torch.allclose(torch.tensor(result["tokens"]), tokens, atol=1e-6)
    assert result["indices"] == indices.tolist()


def test_reconstruct_writes_a_png(tiny_model_dirs, picture, tmp_path):
    out_png = tmp_path / "rec.png"
    out = softvq("reconstruct", picture, "-o", out_png, "--tokenizer", tiny_model_dirs["tokenizer"])
    assert "PSNR" in out.stdout
    assert Image.open(out_png).size == (32, 32)


def test_generate_is_reproducible(tiny_model_dirs, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = [
        "--tokenizer",
        tiny_model_dirs["tokenizer"],
        "--generator",
        tiny_model_dirs["generator"],
    ]
    softvq("generate", "--class", 3, "--seed", 0, "--steps", 3, "-o", a, *args)
    softvq("generate", "--class", 3, "--seed", 0, "--steps", 3, "-o", b, *args)
    assert a.read_bytes() == b.read_bytes()
    grid = tmp_path / "grid.png"
    softvq("generate", "--class", 1, 2, 3, "--steps", 2, "--cfg-scale", 2, "-o", grid, *args)
    assert Image.open(grid).size[0] > 3 * 32


@pytest.mark.parametrize(
    "args,message",
    [
        (["tokenize", "/no/such.png"], "no such file"),
        (["reconstruct", "{garbage}"], "not a readable image"),
        (["tokenize", "{picture}", "--tokenizer", "/no/such/dir"], "cannot load tokenizer"),
        (["generate", "--class", "99", "--steps", "1"], "class ids"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, tiny_model_dirs, picture, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    args = [a.format(garbage=garbage, picture=picture) for a in args]
    if "--tokenizer" not in args:
        args += ["--tokenizer", str(tiny_model_dirs["tokenizer"])]
    if args[0] == "generate":
        args += ["--generator", str(tiny_model_dirs["generator"]), "-o", str(tmp_path / "x.png")]
    proc = softvq(*args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
