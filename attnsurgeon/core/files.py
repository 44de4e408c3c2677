"""Writing files so that a failure leaves nothing half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AttnSurgeonError


def existing_folder(target: Path, what: str = "") -> Path:
    """The folder ``target`` would be written into; an error naming it (after ``what``, such as
    ``"--plot: "``) where it does not exist."""
    folder = target.parent
    if not folder.is_dir():
        raise AttnSurgeonError(f"{what}folder '{folder}' does not exist")
    return folder


@contextmanager
def atomic_path(target: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    On any exception the temporary file is removed and ``target`` is left as it was. With
    ``force=False`` an existing ``target`` is an error, raised before any work.
    """
    target = Path(target).expanduser()
    if target.is_dir():
        raise AttnSurgeonError(f"'{target}' is a folder; give a file name such as {target / 'model.safetensors'}")
    if target.exists() and not force:
        raise AttnSurgeonError(f"'{target}' exists; pass --force to overwrite it")
    folder = existing_folder(target)
    # the temporary name keeps the real extension: some writers (onnx, torch.export) look at it
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".part{target.suffix}", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes 0600, and some writers replace the file: set the user's usual mode last
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str, *, force: bool = True) -> None:
    with atomic_path(target, force=force) as tmp:
        tmp.write_text(text)


def check_new_dir(target: str | os.PathLike, force: bool = False) -> None:
    """What :func:`atomic_dir` refuses, said before any work: an existing folder without ``force``,
    a file in the way, a missing parent folder."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise AttnSurgeonError(f"'{target}' is a file; --out takes a folder")
    if target.exists() and not force:
        raise AttnSurgeonError(f"'{target}' exists; pass --force to replace it, or choose another --out folder")
    existing_folder(target)


@contextmanager
def atomic_dir(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is renamed onto ``target``.

    On any exception the temporary folder and all it holds are removed and ``target`` is left as it
    was: a run that fails half-way leaves no partial output. An existing ``target`` is an error
    unless ``force``, raised before any work; with ``force`` it is replaced only once the new one is
    complete.
    """
    import shutil

    target = Path(target).expanduser()
    check_new_dir(target, force)
    parent = target.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: the user's usual mode
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
