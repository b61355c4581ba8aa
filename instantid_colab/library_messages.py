"""Library messages that say nothing to our users, dropped while the call that makes them runs.

Only exact messages that we have answered are dropped (a filter on the named loggers, for the length of one call);
everything else a library says still reaches the user.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


@contextmanager
def without(loggers: Sequence[str], starting: str | tuple[str, ...]) -> Iterator[None]:
    """Drop the records of these loggers whose message starts with `starting` (or one of them), inside the block."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starting)

    named = [logging.getLogger(name) for name in loggers]
    for logger in named:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in named:
            logger.removeFilter(keep)


@contextmanager
def warnings_without(starting: str) -> Iterator[None]:
    """Drop the Python warnings whose message starts with `starting` (libraries such as peft warn through
    `warnings`, not logging), inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(starting))
        yield
