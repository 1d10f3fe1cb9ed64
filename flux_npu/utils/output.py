"""The one way flux-npu writes a file the user named (every `-o`, the report directory of `verify`).

A regular file (or a new one) is written atomically: a temporary file in the same directory, then
a rename, so a crash, a full disk or Ctrl-C leaves the old file whole and a reader never sees half
of it; a symlink to a regular file keeps being a symlink (its target is replaced), and the old
file's permissions are kept. Anything else is never replaced: a device (`/dev/null`), a FIFO, a
path through `/dev/stdout`, `/dev/fd/N` or `/proc/` (the shell's redirection of our own stdout) is
opened and written in place, as `cat > PATH` would; a directory or a socket is refused with a
message naming the path. (A rename onto `/dev/null` as root replaces the machine's /dev/null.)
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile

# Link hops through these name one of our own open files (the shell's `> file` of stdout): writing
# there must go through the open file, never replace the file it points to.
_STREAM_PREFIXES = ("/proc/", "/dev/fd/", "/dev/stdout", "/dev/stderr")


class OutputError(OSError):
    """The path cannot be written as an output (a directory, a socket, a missing parent directory, a
    file system error); its text names the path and the cause."""


def _link_chain(path: str):
    """The absolute names met while following `path`'s final component through symlinks."""
    seen = [os.path.abspath(path)]
    cur = seen[0]
    for _ in range(40):
        if not os.path.islink(cur):
            break
        nxt = os.readlink(cur)
        cur = os.path.normpath(os.path.join(os.path.dirname(cur), nxt))
        seen.append(cur)
    return seen


def _own_fd(path: str):
    """N when `path` leads to this process's file descriptor N (/dev/stdout, /dev/fd/N, /proc/self/fd/N)."""
    own = (f"/proc/{os.getpid()}/fd/", "/proc/self/fd/", "/dev/fd/")
    for p in _link_chain(path):
        for prefix in own:
            rest = p[len(prefix):] if p.startswith(prefix) else ""
            if rest.isdigit():
                return int(rest)
    return None


def _fileno(stream):
    try:
        return stream.fileno()
    except (OSError, ValueError):
        return None


def output_kind(path: str) -> str:
    """'file' when `path` will be written atomically (a regular file, a symlink to one, or a new file),
    'stream' when it is written in place (device, FIFO, a path through /dev/stdout or /proc).
    Raises OutputError for a directory, a socket or a missing parent directory."""
    path = os.fspath(path)
    if not path:
        raise OutputError("empty output path")
    via_stream = any(p.startswith(_STREAM_PREFIXES) for p in _link_chain(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if via_stream:
            raise OutputError(f"cannot write {path}: it names a file descriptor that is not open") from None
        parent = os.path.dirname(os.path.realpath(path))
        if not os.path.isdir(parent):
            raise OutputError(f"cannot write {path}: directory {parent} does not exist") from None
        return "file"
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write {path}: it is a directory; name the file to write")
    if stat.S_ISSOCK(st.st_mode):
        raise OutputError(f"cannot write {path}: it is a socket, not a file, device or FIFO")
    if stat.S_ISREG(st.st_mode) and not via_stream:
        return "file"
    return "stream"


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_output(path: str, data: str | bytes) -> str:
    """Write `data` (text is UTF-8) to the user's `path` as the module docstring says; returns the
    kind ('file' or 'stream'). File system errors come as OutputError naming the path."""
    kind = output_kind(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if kind == "stream":
        try:
            fd = _own_fd(path)
            if fd is not None:
                # /dev/stdout onto a redirected file: a new open would have its own offset and
                # overwrite what was printed before, or be overwritten after; share the open file
                for stream in (sys.stdout, sys.stderr):
                    if stream is not None and getattr(stream, "fileno", None) and _fileno(stream) == fd:
                        stream.flush()
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
            else:
                with os.fdopen(os.open(path, os.O_WRONLY), "wb") as f:
                    f.write(raw)
        except OSError as exc:  # /dev/full, a FIFO whose reader left, ...
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return kind
    target = os.path.realpath(path)  # a symlink to a regular file stays a symlink
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()  # mkstemp creates 0600; a new output gets the usual umask mode
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return kind
