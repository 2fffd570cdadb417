"""What the core's command-line tools share: stderr logging when run standalone, one-line errors, exit codes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import AdaFaceError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 2


def user_path(text: str) -> Path:
    """An argparse ``type`` for paths: ``~`` expanded, as a shell does not after ``--out=``."""
    return Path(text).expanduser()


def run_cli(action: Callable[[], object], what: str, verbose: bool = False) -> int:
    """Runs ``action``; 0 on success, 2 with ``"<what> failed: <reason>"`` logged on a user-facing error.

    Logging goes to stderr only when nothing has configured it (a standalone run); embedded in
    tests or ComfyUI, the host's logging is left alone.
    """
    root = logging.getLogger()
    handler: Optional[logging.Handler] = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        action()
        return EXIT_OK
    except (AdaFaceError, OSError) as exc:
        logger.error("%s failed: %s", what, " ".join(str(exc).split()))
        return EXIT_FAILED
    finally:
        if handler is not None:
            root.removeHandler(handler)
