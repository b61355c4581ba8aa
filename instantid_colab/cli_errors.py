"""One error boundary for every command line of the package: no traceback reaches a user.

Exit codes (README, "Exit codes"):
  0    done
  1    the run could not do what was asked, for a reason the message names (a file, a face, weights, memory)
  2    the command line is wrong: an unknown option, or a value outside its allowed range
  3    a bug in instantid-colab: the message asks for the `--debug` traceback
  130  stopped with Ctrl-C; nothing half-made was saved
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

OK, FAILED, USAGE, BUG, STOPPED = 0, 1, 2, 3, 130


def run(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace,
        user_errors: tuple[type[BaseException], ...], usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Call `handler(args)`; turn what it raises into a one-paragraph message and an exit code."""
    debug = getattr(args, "debug", False)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C): nothing was saved from the image in progress.", file=sys.stderr)
        return STOPPED
    except usage_errors as error:
        _report(f"error: {error}", debug)
        return USAGE
    except user_errors as error:
        _report(f"error: {error}", debug)
        return FAILED
    except Exception as error:  # noqa: BLE001 - the boundary: anything else is our bug
        _report(f"internal error: {type(error).__name__}: {error}\nThis is a bug in instantid-colab, not in what you "
                "gave it. Run the same command with --debug and report the traceback it prints.", debug)
        return BUG


def _report(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(message, file=sys.stderr)


def debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
