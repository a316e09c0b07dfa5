"""The one exception a user sees, and the faults of the machine that get one line like it."""

from __future__ import annotations

import errno
import re


class OneshotError(ValueError):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


# what the machine did, not what oneshot got wrong: each gets one line and exit 2, never a traceback
_ADVICE = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space (disk quota) or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EIO: "the disk reported an I/O error: check it",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENOENT: "a file or directory went away while oneshot was using it",
}
_RUST_IO = re.compile(r"(?:os error|code:) ?(\d+)")
_TEXT = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
         "Permission denied": errno.EACCES, "Disk quota exceeded": errno.EDQUOT}


def environment_fault(exc: BaseException) -> str | None:
    """One line for a fault of the machine (a full disk, a read-only or unreadable file, an I/O error),
    found in ``exc`` or the exceptions it came from: an ``OSError``, or the same error as safetensors
    (a Rust ``IoError``) or torch report it. ``None`` when ``exc`` is something else (a bug)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _ADVICE:
            where = f"{exc.filename}: " if exc.filename else ""
            return f"{where}{exc.strerror or errno.errorcode.get(exc.errno)}; {_ADVICE[exc.errno]}"
        text = str(exc)
        if type(exc).__name__ in ("SafetensorError", "RuntimeError") or "IoError" in text:
            code = next((c for t, c in _TEXT.items() if t in text), None)
            if code is None and "IoError" in text and (m := _RUST_IO.search(text)):
                code = int(m.group(1))
            if code in _ADVICE:
                return f"{_first_line(text)}; {_ADVICE[code]}"
        exc = exc.__cause__ or exc.__context__
    return None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 300 else line[:297] + "..."
