"""All-or-nothing export directories.

``atomic_directory(target)`` hands out a fresh hidden directory *beside* the target (same file
system, so the final ``rename`` is atomic), and only when the ``with`` block finishes without an
exception are the files fsynced and the directory renamed to ``target``. On any exception —
``KeyboardInterrupt`` (Ctrl-C), ``OSError(ENOSPC)`` (disk full), a bug — the temporary directory is
removed and ``target`` is left exactly as it was. While it is being written the temporary
directory also holds the marker file ``INCOMPLETE_MARKER``; jaxquant's loader refuses any
directory that has it, so even a process killed with SIGKILL (which no code can clean up after)
leaves nothing that loads as a checkpoint.

A non-empty ``target`` is refused unless ``overwrite=True``; then the old directory is moved aside
and deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxquant.errors import ExportError
from jaxquant.interrupt import raise_if_interrupted

INCOMPLETE_MARKER = ".jaxquant-export-incomplete"
TMP_INFIX = ".jaxquant-tmp-"


def check_target(target: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Validate an export target before any work starts (cheap; call it before calibration).

    Returns the absolute target path. Raises ExportError when the target is a file, is non-empty
    without ``overwrite``, or its parent cannot be written.
    """
    t = Path(target).expanduser().absolute()
    if t.exists() and not t.is_dir():
        raise ExportError(f"export target {t} exists and is not a directory. Choose another --export-path.")
    if t.is_dir() and any(t.iterdir()) and not overwrite:
        raise ExportError(
            f"export target {t} is not empty. Pass --overwrite (overwrite=True) to replace it, "
            "or choose another --export-path."
        )
    probe = unwritable_ancestor(t)
    if probe is not None:
        raise ExportError(f"cannot write the export target {t}: {probe} is not writable.")
    return t


def unwritable_ancestor(path: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not writable (so ``path`` cannot be
    created there), else None."""
    probe = Path(path).expanduser().absolute().parent
    while not probe.exists():
        probe = probe.parent
    return None if os.access(probe, os.W_OK | os.X_OK) else probe


def _umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False,
                     validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Context manager yielding a temporary directory that becomes ``target`` on success.

    ``validate(tmp)``, when given, runs on the complete temporary directory before the rename; an
    exception it raises discards the directory like any other failure. The published directory has
    the mode of a freshly made one (``0o777 & ~umask``), not ``mkdtemp``'s private 0o700, so a
    serving engine running under another user can read it.

    Example::

        with atomic_directory("out", overwrite=False) as tmp:
            write_files(tmp)        # an exception here leaves no trace
        # "out" now exists, complete
    """
    t = check_target(target, overwrite=overwrite)
    t.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}{TMP_INFIX}", dir=t.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / INCOMPLETE_MARKER).write_text("jaxquant export in progress; this directory is not a checkpoint\n")
        yield tmp
        (tmp / INCOMPLETE_MARKER).unlink()
        if validate is not None:
            validate(tmp)
        raise_if_interrupted()  # a Ctrl-C swallowed while writing must not publish the directory
        _fsync_tree(tmp)
        if t.exists():
            # Re-check: the target may have been filled while we were writing.
            check_target(t, overwrite=overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{t.name}.jaxquant-old-", dir=t.parent))
            os.rename(t, old / "d")
        os.rename(tmp, t)
        _fsync_dir(t.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not t.exists() and (old / "d").exists():
            os.rename(old / "d", t)  # put the previous export back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_incomplete(directory: str | os.PathLike) -> bool:
    """True for a directory an interrupted export left behind (a SIGKILLed process)."""
    d = Path(directory)
    return (d / INCOMPLETE_MARKER).exists() or TMP_INFIX in d.name
