"""Where ``streamer transcribe -o PATH`` writes, as a shell's ``>`` would, but atomically.

- ``-``: standard output.
- a regular file, or a name that does not exist yet: written to a temporary
  file beside it and renamed over it at the end, so a failed run (bad model,
  bad audio) leaves an existing file untouched and a reader never sees half a
  file. The result keeps the existing file's permission bits (and, where the
  process may, its owner and group); a new file gets ``0666 & ~umask`` like
  any other program's output.
- a symbolic link: its target is written the same way; the link stays a link.
- anything else (a character device such as ``/dev/null`` or a terminal, a
  FIFO): opened and written in place; a rename would replace the device node.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from streamer.errors import StreamerError


def _fail(path: Path | str, exc: OSError) -> StreamerError:
    return StreamerError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def output_file(target: str | Path) -> Iterator[TextIO]:
    """Open ``target`` for UTF-8 text output (see the module docstring)."""
    if str(target) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(target)
    real = Path(os.path.realpath(path))  # a symlink's (final) target; the path itself otherwise
    try:
        st: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a symlink loop, a folder we may not search
        raise _fail(path, exc) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise StreamerError(f"cannot write {path}: it is a folder")
    if st is not None and not stat.S_ISREG(st.st_mode):
        with _in_place(path) as out:
            yield out
        return
    with _atomic(real, st, shown=path) as out:
        yield out


@contextlib.contextmanager
def _in_place(path: Path) -> Iterator[TextIO]:
    """A device or FIFO: open it as it is (a FIFO waits here for its reader)."""
    try:
        out = open(path, "w", encoding="utf-8")  # noqa: SIM115  # closed below
    except OSError as exc:
        raise _fail(path, exc) from None
    with out:
        yield out


@contextlib.contextmanager
def _atomic(path: Path, existing: os.stat_result | None, shown: Path) -> Iterator[TextIO]:
    """Write a temporary file beside ``path``, rename it over ``path`` on success."""
    fd, tmp = _create_temp(path, shown)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if existing is not None:
                with _reported(shown):
                    _copy_owner_and_mode(fd, existing)
            yield out
            with _reported(shown):
                out.flush()
                os.fsync(fd)
        with _reported(shown):
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _reported(path: Path) -> Iterator[None]:
    """Our own file operations' ``OSError`` as a one-line ``StreamerError``."""
    try:
        yield
    except OSError as exc:
        raise _fail(path, exc) from None


def _create_temp(path: Path, shown: Path) -> tuple[int, str]:
    """A new file ``.NAME.XXXXXXXX.tmp`` beside ``path``.

    Created with mode 0666 so that the kernel applies the umask (or the folder's
    default ACL) exactly as for any new file; ``tempfile.mkstemp`` forces 0600.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _fail(shown, exc) from None
    raise StreamerError(f"cannot write {shown}: no free temporary name beside it")


def _copy_owner_and_mode(fd: int, st: os.stat_result) -> None:
    """Give the temporary file the replaced file's owner, group and permission bits."""
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(OSError):  # only root may give a file away
            os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which may clear setuid/setgid
