"""Text files people write by hand (a manifest saved by Excel, a prompt list from Notepad), read in the
encodings their tools write, or refused with one message that says what to save them as."""

from __future__ import annotations

import codecs
from pathlib import Path


def read_text(path: Path, what: str, advice: str, error: type[ValueError] = ValueError) -> str:
    """The text of `path`: UTF-16 with its byte-order mark (Excel's "Unicode Text"), UTF-8 with or without one
    ("CSV UTF-8"), else Windows-1252 (Excel's plain "CSV" and Notepad's "ANSI" on a Western Windows). Anything
    else raises `error` naming `what` and the file, followed by `advice`."""
    data = Path(path).read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\x00" not in text:
            return text
    raise error(f"{what} {path} is not text in UTF-8, UTF-16 or Windows-1252: {advice}")
