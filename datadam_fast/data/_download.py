"""Fetching official archives with MD5 verification and atomic writes (urllib only)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from ._base import DatasetError

__all__ = ["md5sum", "fetch", "download_file", "extract_tar"]

_CHUNK = 1 << 20


def md5sum(path, chunk: int = _CHUNK) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, fileobj, timeout: float = 60.0, progress: bool = True, desc: str = "") -> None:
    """Stream ``url`` into the open binary ``fileobj``. Tests monkeypatch this function."""
    req = urllib.request.Request(url, headers={"User-Agent": "datadam-fast"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        total = resp.headers.get("Content-Length")
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                           desc=desc or os.path.basename(url), leave=False)
            except Exception:  # pragma: no cover - tqdm is a dependency, but never fail on it
                bar = None
        try:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                fileobj.write(block)
                if bar is not None:
                    bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()


def download_file(urls: Sequence[str], dst, md5: Optional[str], progress: bool = True) -> Path:
    """Download the first working URL of ``urls`` to ``dst``, checking ``md5``.

    The data go to a temporary file in ``dst``'s folder, which replaces ``dst`` only once
    the checksum matches (so ``dst`` is never a partial or unverified file). If ``dst``
    already exists with the right checksum nothing is fetched. Raises :class:`DatasetError`
    when every URL fails or gives the wrong checksum."""
    dst = Path(dst)
    if isinstance(urls, str):
        urls = [urls]
    if dst.is_file() and (md5 is None or md5sum(dst) == md5):
        return dst
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {dst.parent}: {e}") from None
    problems = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fetch(url, f, progress=progress, desc=dst.name)
            got = md5sum(tmp)
            if md5 is not None and got != md5:
                problems.append(f"{url}: MD5 mismatch (got {got}, expected {md5})")
                continue
            os.replace(tmp, dst)
            return dst
        except (urllib.error.URLError, OSError, ValueError) as e:
            problems.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DatasetError(f"download of {dst.name} failed ({'; '.join(problems)}); "
                       f"place the file at {dst} by hand instead")


def extract_tar(archive, dest_dir) -> None:
    """Extract a (gzipped) tar into ``dest_dir``, refusing members that escape it.

    Extraction goes to a temporary folder beside ``dest_dir`` whose top-level entries are
    then renamed into place, so an interrupted extraction leaves no half-written folder."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar.getmembers():
                    target = (tmp / m.name).resolve()
                    if not (str(target) + os.sep).startswith(str(tmp.resolve()) + os.sep) \
                            or m.issym() or m.islnk() or m.isdev():
                        raise DatasetError(f"{archive}: unsafe member {m.name!r} in archive")
                try:
                    tar.extractall(tmp, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(tmp)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetError(f"{archive}: not a readable tar archive ({e}); delete it and "
                               f"download again") from None
        for entry in tmp.iterdir():
            final = dest_dir / entry.name
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(entry, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
