"""What build this process runs: the package's version and the source revision it was
built from, for ``echowin_gateway_build_info``.

The revision is read once: from ``ECHOWIN_GATEWAY_REVISION`` (the Dockerfile sets it from
its ``REVISION`` build argument), else ``git rev-parse`` when the package runs from a git
checkout (``make run``, an editable install), else ``unknown``.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

REVISION_ENV = "ECHOWIN_GATEWAY_REVISION"
UNKNOWN = "unknown"
_REVISION_RE = re.compile(r"[0-9a-f]{7,40}")
_CHECKOUT = Path(__file__).resolve().parents[2]  # the directory holding proxy/


@functools.cache
def revision() -> str:
    """The source revision (hex, at most 40 characters), or ``unknown``; never raises."""
    given = os.environ.get(REVISION_ENV, "").strip().lower()
    if given:
        return given if _REVISION_RE.fullmatch(given) else UNKNOWN
    if not (_CHECKOUT / ".git").exists():  # a directory, or a file in a worktree
        return UNKNOWN
    try:
        done = subprocess.run(  # noqa: S603 - fixed arguments
            ["git", "-C", str(_CHECKOUT), "rev-parse", "HEAD"],  # noqa: S607 - git on PATH
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    found = done.stdout.strip()
    return found if done.returncode == 0 and _REVISION_RE.fullmatch(found) else UNKNOWN


__all__ = ["REVISION_ENV", "UNKNOWN", "revision"]
