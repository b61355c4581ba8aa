"""One picture at a time on the GPU, first come first served, for everyone a share link reaches.

gradio's queue serialises a click handler, but each waiting person then sees only gradio's spinner, one Stop
button would have to reach into another person's run, and a run whose browser went away keeps its place. Here
each run takes a `Turn` in one line: it knows how many are ahead of it (shown on its own page), it carries its own
Stop flag (a person's Stop reaches only their own run, waiting or running), and leaving the line (finished,
stopped, refused or disconnected) lets the next one start at once. The line holds at most `limit` runs; a click
beyond that is refused with how many are ahead, instead of waiting unboundedly.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

LINE_LIMIT = 8  # runs in line at once (one on the GPU, seven waiting): on a free T4 the last waits about 6 minutes


class Busy(Exception):
    """The line is full, or this browser session already has a run in it; the message says how many are ahead."""


@dataclass(eq=False)
class Turn:
    """One run's place in the line: whose it is (a browser session) and its Stop flag."""

    session: str
    stop: threading.Event = field(default_factory=threading.Event)


class GpuLine:
    def __init__(self, limit: int = LINE_LIMIT):
        self.limit = limit
        self._turns: list[Turn] = []
        self._changed = threading.Condition()
        # The one thread that makes the pictures, run after run. A new thread per run made glibc give each its own
        # malloc arena, which keeps the freed megabytes of a 1024x1024 picture: the server's memory grew by about
        # 19 MiB a picture on a 16-core machine (BENCHMARKS.md, "A share link under load").
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-line")

    def join(self, session: str) -> Turn:
        """A new turn at the end of the line; Busy when the line is full or `session` already stands in it."""
        with self._changed:
            mine = [index for index, turn in enumerate(self._turns) if turn.session == session]
            if mine:
                raise Busy(f"Your earlier picture is still {'being made' if mine[0] == 0 else 'waiting'} "
                           f"({mine[0]} ahead of it): wait for it, or press Stop first.")
            if len(self._turns) >= self.limit:
                raise Busy(f"Busy: {len(self._turns)} pictures are ahead of you, the most this app takes at once "
                           f"({self.limit}). Try again in a few minutes.")
            turn = Turn(session)
            self._turns.append(turn)
            return turn

    def ahead(self, turn: Turn) -> int:
        with self._changed:
            return self._turns.index(turn)

    def wait(self, turn: Turn, seconds: float) -> bool:
        """True once `turn` is first in line; False after `seconds` or when its Stop flag is set."""
        with self._changed:
            return self._changed.wait_for(lambda: self._turns[0] is turn or turn.stop.is_set(), seconds) and \
                self._turns[0] is turn

    def leave(self, turn: Turn) -> None:
        with self._changed:
            if turn in self._turns:
                self._turns.remove(turn)
            self._changed.notify_all()

    def stop(self, session: str) -> bool:
        """Set the Stop flag of `session`'s run, waiting or running; False when it has none in line."""
        with self._changed:
            for turn in self._turns:
                if turn.session == session:
                    turn.stop.set()
                    self._changed.notify_all()
                    return True
        return False

    def __len__(self) -> int:
        with self._changed:
            return len(self._turns)
