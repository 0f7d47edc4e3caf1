"""Output files of a run (``config.yaml``, the worker entry script, ``metrics.jsonl``, checkpoints), written safely.

* No symbolic link is followed below the output directory: ``safe_path(root, *parts)`` refuses a path whose
  components under ``root`` (``--output-dir``, which may itself be a link) include a link, a file is replaced by
  ``os.replace`` of a temporary file made with ``O_EXCL | O_NOFOLLOW`` (a link at the name is replaced, its target
  untouched) and appended to with ``O_NOFOLLOW``.
* A failed write (a full disk: ``ENOSPC``) removes its temporary file and raises ``OutputError`` naming the file
  and the cause, so the worker's one-line error says "no space left on device", not a rank that vanished.
"""
import errno
import os
from typing import Iterable, Union

_FLAGS = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class OutputError(ValueError):
    """A run's output cannot be written (``errno`` kept: ``ENOSPC`` for a full disk, ``ELOOP`` for a link)."""

    def __init__(self, path: str, problem: str, fix: str, code: int = 0):
        super().__init__(f"cannot write {path}: {problem}. Fix: {fix}.")
        self.path, self.errno = path, code


def os_error(path: str, err: OSError) -> OutputError:
    """``err`` (raised writing ``path``) as an ``OutputError`` naming its cause."""
    name = errno.errorcode.get(err.errno or 0, "")
    problem = f"{err.strerror or err}" + (f" ({name})" if name else "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that file system (or pass another --output-dir) and resume from the last checkpoint"
    elif err.errno == errno.ELOOP:
        fix = "remove the symbolic link: mf-longseq writes its output files only as regular files"
    else:
        fix = "check the permissions and the file system of the output directory"
    return OutputError(path, problem, fix, err.errno or 0)


def safe_path(root: str, *parts: str) -> str:
    """``root/parts...``, refusing when a component below ``root`` (the output directory) is a symbolic link.

    Raises:
        OutputError: naming the link and where it points.
    """
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise OutputError(path, f"it is a symbolic link (to {os.readlink(path)}) inside the output directory "
                              f"{root}", "remove the link, or choose another --output-dir", errno.ELOOP)
    return path


def _write_bytes(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (the one place bytes reach the disk; tests simulate ENOSPC here)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: str, data: Union[str, bytes], mode: int = 0o644) -> str:
    """Replace ``path`` by ``data`` in one rename; a link at ``path`` is replaced, never followed.

    Raises:
        OutputError: the write failed (the temporary file is removed).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, _FLAGS | os.O_CREAT | os.O_EXCL, mode)
    except OSError as err:
        raise os_error(path, err) from None
    try:
        try:
            _write_bytes(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        remove_quietly([tmp])
        raise os_error(path, err) from None
    return path


def append_text(path: str, text: str) -> None:
    """Append ``text`` to ``path`` (created when absent); refused (``OutputError``, ELOOP) when ``path`` is a link."""
    try:
        fd = os.open(path, _FLAGS | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        raise os_error(path, err) from None
    try:
        _write_bytes(fd, text.encode("utf-8"))
    except OSError as err:
        raise os_error(path, err) from None
    finally:
        os.close(fd)


def remove_quietly(paths: Iterable[str]) -> None:
    """Remove files that may or may not exist (clean-up after a failed write)."""
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


__all__ = ["OutputError", "os_error", "safe_path", "write_atomic", "append_text", "remove_quietly"]
