"""The one way a command makes its output: checked first, built under a temporary name, removed if it fails.

Every command that writes something opens its output with one of these, before any heavy work:

    with outputs.folder(args.out, holds=["predictions_dev.txt"], force=args.force):   # files into a folder
        ...                                               # each file written with plumbing.files.atomic_write
    with outputs.new_folder(args.out, force=args.force) as tmp:                       # a folder made whole
        ...                                               # fill tmp; it becomes args.out when the block ends
    with outputs.file(args.json, force=args.force) as f:                              # one file
        f.write(...)

Each one
  1. checks the place before any work, each mistake a one-line UserError: a file where a folder is wanted (or a
     folder where a file is), a place that cannot be written (read-only, no permission), or something of the
     user's it would replace, naming the flag that allows it;
  2. makes the folders that are missing on the way (new_folder and file: under a temporary name, renamed when
     the block ends without an error);
  3. if the block raises anything (a UserError, Ctrl-C's KeyboardInterrupt, SystemExit), removes what it made:
     the temporary name and every folder it created, parents included, with whatever was put into them. What
     was there before stays as it was.

A command that learns its output's names only after some reading (eval.py's predictions file, analyze's
heatmaps) calls the check_ functions first; one whose output is made by child processes (the sweep) wraps
its work in plumbing.files.removed_on_failure. tests/test_fault_table.py holds every command to this.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from plumbing.errors import UserError
from plumbing.files import atomic_write, made_folders, temp_name


def writable(folder) -> None:
    """A one-line error unless `folder` is, or can be made, a folder we can write into: the nearest part of it
    that exists must be a folder we may write to."""
    folder = Path(folder).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing} (permission denied or read-only)")


def refuse_replacing(paths, flag="--force", option="--out") -> None:
    """A one-line error if any of `paths` exists: it is the user's, and only `flag` (None: nothing) replaces it."""
    taken = [Path(p) for p in paths if Path(p).exists()]
    if taken:
        more = f" ({len(taken)} of the outputs do)" if len(taken) > 1 else ""
        how = f"pass {flag} to replace {'them' if more else 'it'}, or give" if flag else "give"
        raise UserError(f"{taken[0]} already exists{more}; {how} another {option}")


def check_folder(path, holds=(), force=False, flag="--force", option="--out") -> None:
    """folder()'s checks, before any work: `path` can be a folder we write into, and none of the files `holds`
    names is there already (unless `force`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder")
    writable(path)
    if not force:
        refuse_replacing([path / name for name in holds], flag, option)


def check_new_folder(path, force=False, flag="--force", option="--out", empty_ok=False) -> None:
    """new_folder()'s checks: `path` is not there yet (or is an empty folder, if `empty_ok`; or `force` replaces
    it), and its parent can be made and written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder")
    if path.exists() and not force and not (empty_ok and not any(path.iterdir())):
        if empty_ok:
            raise UserError(f"{path} exists and is not empty; give a new (or empty) folder as {option}")
        refuse_replacing([path], flag, option)
    writable(path.parent)


def check_file(path, force=False, flag="--force", option="--out") -> None:
    """file()'s checks: `path` is not a folder, not there yet (unless `force`), and can be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a file")
    writable(path.parent)
    if not force:
        refuse_replacing([path], flag, option)


@contextmanager
def folder(path, holds=(), force=False, flag="--force", option="--out", kept_when=None) -> Iterator[Path]:
    """A folder that may exist, for the files `holds` names (written by the block with atomic_write). On an error
    the folders made here are removed, unless by then they hold the file `kept_when` (train.py's ckpt.pt: a run
    that can be resumed)."""
    check_folder(path, holds, force, flag, option)
    with made_folders(path, keep=lambda: kept_when is not None and (Path(path) / kept_when).exists()):
        yield Path(path)


@contextmanager
def new_folder(path, force=False, flag="--force", option="--out", empty_ok=False) -> Iterator[Path]:
    """A whole folder: yields a temporary folder beside `path` that becomes `path` when the block ends. With
    `force`, an existing `path` is replaced only once the new one is complete."""
    path = Path(path)
    check_new_folder(path, force, flag, option, empty_ok)
    with made_folders(path.parent):
        tmp = temp_name(path, ".tmpdir")
        tmp.mkdir()
        try:
            yield tmp
            # Checked again: something may have made `path` while the block ran.
            check_new_folder(path, force, flag, option, empty_ok)
            old = temp_name(path, ".old") if path.exists() else None
            if old is not None:
                os.rename(path, old)  # moved aside, and removed only once the new folder is in place
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def file(path, force=False, flag="--force", option="--out") -> Iterator[BinaryIO]:
    """One file, written under a temporary name and renamed when the block ends (plumbing.files.atomic_write)."""
    check_file(path, force, flag, option)
    with atomic_write(path) as f:  # which removes a folder it made for the file if the block fails
        yield f
