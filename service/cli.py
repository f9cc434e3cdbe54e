"""The ``softvq`` command. Each area registers its own subcommands:

- ``service.cli_model``: tokenize, reconstruct, generate (run the models directly);
- ``service.cli_serve``: serve, worker;
- ``model.training.cli``: train-teacher, train-tokenizer, train-generator, train-demo, and
  through it ``model.training.evaluate_cli``: evaluate-demo.

A user error (bad path, unreadable image, bad argument) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys

from model.usage import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from model.training import cli as training_cli

    from . import cli_model, cli_serve

    parser = argparse.ArgumentParser(prog="softvq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cli_model, cli_serve, training_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"softvq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s copy (one set of registered commands).
    from service.cli import main as _main

    sys.exit(_main())
