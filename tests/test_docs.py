"""README stays the front door: the two commands, and every setting documented."""

from pathlib import Path

from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    for name in Settings.model_fields:
        assert f"| `SOFTVQ_{name.upper()}` |" in README, name


def test_the_two_commands():
    assert "pip install torch==2.13.0 && pip install -e . && softvq serve" in README
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python3 -m pytest -q'
    assert test_cmd in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and '-e ".[test]"' in ci and "torch==2.13.0" in ci


def test_documented_subcommands_exist():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for cmd in (
        "serve",
        "worker",
        "tokenize",
        "reconstruct",
        "generate",
        "train-tokenizer",
        "train-generator",
    ):
        assert cmd in commands
        assert f"softvq {cmd}" in README, cmd
