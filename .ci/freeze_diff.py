"""Fail when a package that was installed before changed version or went away; print what was added, and with
LOCK, fail when something was added at another version than the lock's (the lock was not what got installed).

    python3 .ci/freeze_diff.py BEFORE AFTER WHAT [LOCK]     (BEFORE, AFTER: `pip freeze --all` output)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def versions(path: str) -> dict[str, str]:
    found = {}
    for line in Path(path).read_text().splitlines():
        name, equals, version = line.partition("==")
        if equals:
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
        elif " @ " in line:
            name, _, location = line.partition(" @ ")
            found[re.sub(r"[-_.]+", "-", name).lower()] = location
    return found


def main() -> int:
    before, after, what = versions(sys.argv[1]), versions(sys.argv[2]), sys.argv[3]
    changed = [f"{name}: {version} -> {after.get(name, 'removed')}" for name, version in sorted(before.items())
               if after.get(name) != version]
    added = [f"{name}=={version}" for name, version in sorted(after.items()) if name not in before]
    print(f"{what}: {len(added)} added" + (f": {', '.join(added)}" if added else ""))
    if changed:
        print(f"{what} changed {len(changed)} package(s) of Colab's image:\n  " + "\n  ".join(changed))
        return 1
    print(f"{what}: none of the {len(before)} packages that were there changed")
    if len(sys.argv) > 4:
        lock = versions(sys.argv[4])
        unlocked = [f"{name}=={after[name]} (lock: {lock.get(name, 'absent')})" for name in sorted(after)
                    if name not in before and name != "instantid-colab" and lock.get(name) != after[name]]
        if unlocked:
            print(f"{what} added {len(unlocked)} package(s) at other versions than {sys.argv[4]}'s:\n  "
                  + "\n  ".join(unlocked))
            return 1
        print(f"{what}: every package added is at the version of {sys.argv[4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
