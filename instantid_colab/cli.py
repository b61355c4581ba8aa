"""Command line: `python -m instantid_colab COMMAND`.

Each command is a thin call into the module that owns the concern; heavy imports happen inside
the command so that `doctor` works on a machine where diffusers or torch are broken.
"""

from __future__ import annotations

import argparse
import sys


def _doctor(args: argparse.Namespace) -> int:
    raise NotImplementedError("doctor: owned by the foundation work")


def _inspect(args: argparse.Namespace) -> int:
    raise NotImplementedError("inspect: owned by adapter.py work")


def _generate(args: argparse.Namespace) -> int:
    raise NotImplementedError("generate: owned by pipeline.py work")


def _app(args: argparse.Namespace) -> int:
    raise NotImplementedError("app: owned by app.py work")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instantid_colab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    doctor = commands.add_parser("doctor", help="environment, memory and the memory plan")
    doctor.add_argument("--json", action="store_true", help="one JSON object: environment, memory, plan")
    doctor.set_defaults(handler=_doctor)

    inspect = commands.add_parser("inspect", help="read an InstantID adapter file's architecture")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=_inspect)

    generate = commands.add_parser("generate", help="make one image from a face photo")
    generate.set_defaults(handler=_generate)

    app = commands.add_parser("app", help="the gradio app")
    app.set_defaults(handler=_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
