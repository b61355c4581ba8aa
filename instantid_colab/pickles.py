"""What a refused `torch.load(..., weights_only=True)` means, in words a person can act on.

torch answers both a damaged file and a pickle that would run code with the same UnpicklingError
and a long hint to turn the protection off; the two need opposite advice (download again vs. do not
load it), so the checkpoint readers ask here which one it was.
"""

from __future__ import annotations

import pickle
import re


def refused_object(error: BaseException) -> str | None:
    """The Python object a weights-only load refused (e.g. 'posix.system'), or None when the file is just damaged."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    match = re.search(r"GLOBAL\s+([\w.]+)", str(error))
    return match.group(1) if match else None
