"""Safe output paths: atomic output directories, containment checks, stale partial-directory recovery.

- ``is_within(path, root)``: ``path`` is ``root`` or inside it, after ``..``, symlinks (``realpath``)
  and, for what exists, inode identity (bind mounts, hard-linked or case-folded names).
- ``check_disjoint(out, src)``: neither path contains the other (the source is never written).
- ``check_output_dir(out, overwrite, replaceable)``: raises before any work when ``out`` may not be
  written: it exists without ``overwrite``, is a file or a symlink, or is not one of ours.
- ``atomic_output_dir(out, ...)``: a context yielding a fresh sibling ``.NAME.partial-*`` directory
  that replaces ``out`` only when the block succeeds. One writer per output: ``.NAME.lock`` (an
  ``flock``, released by the kernel when its process dies, SIGKILL included). Holding it, a later run
  removes what killed runs left (``.NAME.partial-*``; ``.NAME.old-*`` is a replaced output, restored
  when the kill came between the two renames of the swap).

Nothing here deletes a path it did not create, or a directory ``replaceable`` does not accept.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable

PARTIAL = "partial"
OLD = "old"



CACHE_ENV = "LAVIT_CACHE"


def cache_home() -> str:
    """lavit-jax's cache root: ``$LAVIT_CACHE``, else ``$XDG_CACHE_HOME/lavit-jax`` (``~/.cache/lavit-jax``)."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lavit-jax")

def resolve(path) -> str:
    """Absolute path with ``..`` and symlinks resolved (the path need not exist)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_within(path, root) -> bool:
    """True when ``path`` is ``root`` or lies inside it, whatever the spelling (relative, ``..``, symlinks)."""
    p, r = resolve(path), resolve(root)
    if p == r or p.startswith(r.rstrip(os.sep) + os.sep):
        return True
    try:  # the same directory under another name (bind mount, case-insensitive file system)
        target = os.stat(r)
    except OSError:
        return False
    q = p
    while True:
        try:
            if os.path.samestat(os.stat(q), target):
                return True
        except OSError:
            pass
        parent = os.path.dirname(q)
        if parent == q:
            return False
        q = parent


def check_disjoint(out, src, out_flag: str = "--out", src_flag: str = "--src") -> None:
    """Raises ValueError when ``out`` is inside ``src`` or ``src`` inside ``out`` (or they are the same)."""
    if is_within(out, src):
        raise ValueError(f"{out_flag} {out} is inside {src_flag} {src}: the source is never modified")
    if is_within(src, out):
        raise ValueError(f"{src_flag} {src} is inside {out_flag} {out}: replacing {out_flag} would delete the "
                         f"source; choose another {out_flag}")


def _name_parts(out_dir: str) -> tuple[str, str]:
    out = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out.rstrip(os.sep))
    if not name:
        raise ValueError(f"output directory {out_dir!r} has no name")
    return parent, name


def sibling_dirs(out_dir, kind: str) -> list[str]:
    """Existing ``.NAME.<kind>-*`` siblings of ``out_dir`` (kind 'partial' or 'old'), oldest first."""
    parent, name = _name_parts(out_dir)
    prefix = f".{name}.{kind}-"
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []
    paths = [os.path.join(parent, n) for n in names]

    def mtime(p):
        try:
            return os.lstat(p).st_mtime
        except OSError:
            return 0.0

    return sorted(paths, key=mtime)


def remove_tree(path: str) -> None:
    """Removes a directory tree without following symlinks (a symlink itself is unlinked)."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    shutil.rmtree(path)


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(out_dir, overwrite: bool = False, replaceable: Callable[[str], bool] | None = None,
                     kind: str = "an empty directory", flag: str = "--out") -> str:
    """The absolute output path, or an error before any work when it may not be (re)placed.

    ``replaceable(path)`` says whether an existing directory is one this program wrote (for a
    checkpoint: its manifest); without it only an empty directory is replaced. ``kind`` describes
    what ``replaceable`` accepts, for the message.
    """
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out):
        if os.path.islink(out):
            raise FileExistsError(f"{flag} {out} is a symbolic link; pass the directory itself "
                                  f"({os.path.realpath(out)}) or a new path")
        if not os.path.isdir(out):
            raise FileExistsError(f"{flag} {out} exists and is not a directory; not replaced")
        if not overwrite:
            raise FileExistsError(f"output directory exists: {out} (pass --overwrite to replace it)")
        ok = replaceable(out) if replaceable is not None else not os.listdir(out)
        if not ok:
            raise FileExistsError(f"{flag} {out} exists and is not {kind}: not replaced (--overwrite replaces "
                                  f"only {kind}); choose another {flag} or remove it yourself")
    anchor = _nearest_existing(os.path.dirname(out))
    if not os.path.isdir(anchor):
        raise NotADirectoryError(f"{flag} {out}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out}: cannot write in {anchor} (permission denied)")
    return out


@contextlib.contextmanager
def output_lock(out_dir):
    """Holds ``.NAME.lock`` next to ``out_dir`` (one writer per output); FileExistsError if another holds it."""
    parent, name = _name_parts(out_dir)
    path = os.path.join(parent, f".{name}.lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _write_error(parent, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise FileExistsError(f"another process{who} is writing {os.path.join(parent, name)} "
                                  f"(it holds {path}); wait for it to finish") from None
        try:  # the previous holder may have unlinked the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def recover_stale(out_dir, log=None, protect: Iterable = ()) -> list[str]:
    """Cleans up after killed writers of ``out_dir``; call only while holding ``output_lock(out_dir)``.

    A ``.NAME.old-*`` directory is the previous output moved aside by a swap; when ``out_dir`` is
    missing the newest is moved back (a kill between the two renames), the rest are removed with
    every ``.NAME.partial-*``. Returns the removed paths. ``protect``ed paths are never removed.
    """
    log = log or (lambda msg: None)
    out = os.path.abspath(os.fspath(out_dir))
    olds = [p for p in sibling_dirs(out, OLD) if os.path.isdir(p) and not os.path.islink(p)]
    if olds and not os.path.lexists(out):
        os.rename(olds.pop(), out)
        log(f"restored {out} from an interrupted replacement")
    removed = []
    for path in sibling_dirs(out, PARTIAL) + olds:
        if any(is_within(p, path) for p in protect):
            continue
        remove_tree(path)
        removed.append(path)
        log(f"removed {os.path.basename(path)} (left by an interrupted run)")
    return removed


def _write_error(where: str, e: OSError) -> OSError:
    why = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large (size limit)"}.get(e.errno, e.strerror)
    return type(e)(e.errno, f"cannot write in {where}: {why}")


def _make_dir(parent: str, prefix: str) -> str:
    """A new directory ``parent/prefix<random>`` with the mode a plain ``mkdir`` gives (umask applies)."""
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary directory {prefix}* in {parent}")


def _remove_soon(path: str, attempts: int = 20, delay: float = 0.1) -> None:
    """Removes ``path``, retrying while writers that outlive a failure (background I/O threads) add files."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(delay)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False, *, replaceable: Callable[[str], bool] | None = None,
                      kind: str = "an empty directory", protect: Iterable = (), log=None, flag: str = "--out"):
    """Yields a fresh temporary sibling directory that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is replaced only with ``overwrite`` and when ``replaceable(out_dir)``
    accepts it (see ``check_output_dir``), and only after the new one is whole. ``protect``: paths
    that ``out_dir`` may neither contain nor lie in (the source of a conversion). A failing block
    removes its temporary directory; a killed one leaves it for the next run to remove.
    """
    out = os.path.abspath(os.fspath(out_dir))
    for p in protect:
        check_disjoint(out, p, flag, "the source")
    check_output_dir(out, overwrite, replaceable, kind, flag)
    parent, name = _name_parts(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise _write_error(parent, e) from e
    with output_lock(out):
        recover_stale(out, log, protect)
        check_output_dir(out, overwrite, replaceable, kind, flag)  # a restored output counts as existing
        try:
            tmp = _make_dir(parent, f".{name}.{PARTIAL}-")
        except OSError as e:
            raise _write_error(parent, e) from e
        try:
            yield tmp
        except BaseException:
            _remove_soon(tmp, attempts=100)
            if os.path.lexists(tmp):  # writer threads still adding files: remove it once they have ended
                atexit.register(shutil.rmtree, tmp, ignore_errors=True)
            raise
        if os.path.lexists(out):
            old = os.path.join(parent, f".{name}.{OLD}-{secrets.token_hex(4)}")
            os.rename(out, old)
            os.rename(tmp, out)
            _fsync_dir(parent)
            remove_tree(old)
        else:
            os.rename(tmp, out)
        _fsync_dir(parent)


def atomic_write(path, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """``write(tmp)`` into a hidden sibling ``.NAME.partial-*``, fsynced, then renamed onto ``path``: ``path``
    is either absent, its old content or the whole new file, whatever kills the process. The temporary file
    is removed when ``write`` fails.

    ``overwrite=False``: FileExistsError naming ``path`` when it exists, before ``write`` runs and again when
    the finished file is published (a hard link, which fails if another writer created ``path`` meanwhile;
    a plain check-then-rename where the file system has no hard links)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    final = os.path.join(parent, name)
    if not overwrite and os.path.lexists(final):
        raise FileExistsError(f"file exists: {final} (not overwritten)")
    tmp = os.path.join(parent, f".{name}.{PARTIAL}-{secrets.token_hex(4)}{os.path.splitext(name)[1]}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            _publish_new(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _publish_new(tmp: str, final: str) -> None:
    """Moves the finished ``tmp`` to ``final`` only if ``final`` does not exist (FileExistsError otherwise)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise FileExistsError(f"file exists: {final} (created while it was being written; not overwritten)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(final):  # no hard links here: check, then rename
            raise FileExistsError(f"file exists: {final} (not overwritten)") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def atomic_write_json(path, obj) -> None:
    """``obj`` as strict JSON (NaN refused) at ``path``, written atomically (``atomic_write``)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
    atomic_write(path, write)
