"""Writing files so that a failure leaves nothing half-written."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AttnSurgeonError


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
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise AttnSurgeonError(f"folder '{folder}' does not exist")
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
