"""A directory's files replaced as one change, even across a killed process.

A save writes every new file under a temporary name, flushes it to disk, then commits by renaming
a journal into place (``.peftify-save.json``: which temporary file becomes which name, which old
files go). Only then are the files renamed over the old ones. A save stopped before its commit
leaves the previous files as they were; one stopped after it is finished by the next save or
load of the directory. Saves and loads of one directory take turns (an advisory lock on the
directory where the system has one), so another process's save is never read half done."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from peftify.errors import SpecError

JOURNAL = ".peftify-save.json"

_HELD = threading.local()  # the directories this thread holds locked, by (device, inode)
_FDS: set[int] = set()  # the descriptors holding them, in this process


def _close_inherited_locks() -> None:
    # a forked child (a DataLoader worker) would keep its copies of them, and with them the
    # locks, until it exits: the parent's own descriptors keep the locks held
    for fd in list(_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `directory` (``flock``; nothing where the system has none).
    Yields whether this thread held it already: a save from a signal handler (a preemption
    checkpoint) during another save goes ahead inside it rather than wait on itself for good."""
    try:
        stat = os.stat(directory)
        key = (stat.st_dev, stat.st_ino)
    except OSError:
        key = None
    held = _HELD.__dict__.setdefault("keys", set())
    if key is not None and key in held:
        yield True
        return
    fd = None
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
        _FDS.add(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if key is not None:
            held.add(key)
    except (ImportError, OSError):  # Windows, or a file system without locks: no turns to take
        pass
    try:
        yield False
    finally:
        held.discard(key)
        if fd is not None:
            _FDS.discard(fd)
            os.close(fd)


def replace_files(directory: Path, writes: dict[str, Callable[[str], object]], stale: tuple[str, ...] = (), nested: bool = False) -> None:
    """Write `writes` (file name → a function writing that file at the path it is given) into
    `directory` as one change, and remove the `stale` names. Call it with the directory locked
    (`nested`: inside another save of this thread)."""
    finish_save(directory, (*writes, *stale), nested)
    mode = 0o666 & ~_umask()  # as a plain open() would create them (mkstemp's are private)
    made: list[str] = []
    try:
        place = {}
        for name, write in writes.items():
            made.append(_temporary(directory, name))
            write(made[-1])
            os.chmod(made[-1], mode)
            _flush(made[-1])
            place[name] = Path(made[-1]).name
        made.append(_temporary(directory, JOURNAL))
        # every stale name, present or not: one a save nested in this one (a signal handler's) writes
        # before this commit goes too, so that the directory holds the adapter committed last
        Path(made[-1]).write_text(json.dumps({"place": place, "remove": list(stale)}))
        os.chmod(made[-1], mode)  # readable like the files it names: whoever loads next may have to finish it
        _flush(made[-1])
        os.replace(made[-1], directory / JOURNAL)  # the commit: from here on the save is finished, if not now then later
    except BaseException:
        if not (directory / JOURNAL).exists():  # not committed: the previous files stand
            for path in made:
                Path(path).unlink(missing_ok=True)
        raise
    _flush(directory)
    finish_save(directory, (*writes, *stale), nested)


def finish_save(directory: Path, names: tuple[str, ...], nested: bool = False) -> None:
    """Finish a save that was stopped after its commit, and drop the temporary files of saves of
    `names` stopped before theirs (names `_temporary` makes, not a user's own hidden files):
    not inside another save of this thread (`nested`), whose files they may be, and not where
    the directory is read-only (a load still reads the adapter in place)."""
    journal = directory / JOURNAL
    if journal.is_file():
        record = _read(journal)
        try:
            todo = json.loads(record)
            place, remove = dict(todo["place"]), list(todo["remove"])
            # only this directory's adapter files and their temporaries: a record that came with a
            # downloaded directory must not move or remove anything else
            strange = [n for n in (*place, *remove) if n not in names] + [t for n, t in place.items() if not _made_for(n, t)]
            if strange:
                raise ValueError(f"it names {strange[0]!r}, not one of the adapter's files {list(names)} or their temporaries")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SpecError(f"{str(journal)!r}, the record of a save that was stopped, is damaged ({e}); remove it and save again") from e
        # a save nested in this one (a signal handler's) may finish this journal and commit its own
        # meanwhile (its record names other temporaries): from then on this one's lists are
        # stale, and its steps stop
        for name, temporary in place.items():
            if _read(journal) != record:
                return
            try:
                os.replace(directory / temporary, directory / name)
            except FileNotFoundError:  # put in place already (by a save that may have replaced it since, then stop)
                if _read(journal) != record:
                    return
                if not (directory / name).exists():  # nor in place: that save is lost
                    raise SpecError(
                        f"{str(journal)!r}, the record of a save that was stopped, names {temporary!r}, which is gone, and {name!r} is not in place: "
                        "that save cannot be finished (nothing was removed); remove the record and save again"
                    ) from None
        for name in remove:
            if _read(journal) != record:
                return
            (directory / name).unlink(missing_ok=True)
        if _read(journal) == record:
            journal.unlink(missing_ok=True)
        _flush(directory)
    if nested:
        return
    pending = _pending(journal)  # a save committed since (a signal handler's) still needs its temporaries
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.name not in pending and any(_made_for(name, path.name) for name in (*names, JOURNAL)):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _read(journal: Path) -> str | None:
    """A journal's record, None where there is none. Records differ between saves (each names its
    own temporaries), where a file's inode and time may not (an inode reused at once, a file
    system's whole-second times)."""
    try:
        return journal.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _pending(journal: Path) -> set[str]:
    """The temporaries a journal present now names, which its save still has to put in place."""
    try:
        return {t for t in json.loads(_read(journal) or "{}").get("place", {}).values() if isinstance(t, str)}
    except (ValueError, AttributeError):
        return set()


def _made_for(name: str, temporary) -> bool:
    """Whether `temporary` is a name `_temporary` gives a file written for `name` (mkstemp's 8 characters)."""
    return isinstance(temporary, str) and re.fullmatch(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp", temporary) is not None


def _temporary(directory: Path, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return path


def _flush(path) -> None:
    """Put a file's contents (a directory's entries) on disk, so that a commit never names files
    a power cut could leave empty; where the system cannot, nothing."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read where the system shows it: setting it to read it (the only
    portable way) leaves it 0 for an instant, in which another thread creates world-writable files."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask
