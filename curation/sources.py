"""Enumerating ingest inputs: folders (recursive), WebDataset tar shards and parquet/CSV lists of paths.

Each source yields `Item`s in a deterministic order. An input that cannot become an image at all (a tar
member with an unsafe path, a symlink that leaves its folder, a listed file that does not exist, ...)
is yielded already carrying its quarantine reason, so nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import pyarrow.parquet as pq

from lvdflow.errors import UserError

# Names that hold an image, decodable here or not: a tar member by any other name is a WebDataset side file
# (.json, .txt, .cls). Formats Pillow cannot open (HEIC, JPEG XL, SVG) are listed so that such members are
# quarantined with their reason rather than counted as side files and lost.
IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".ico",
    ".jp2", ".jfif", ".tga", ".avif", ".qoi", ".psd", ".dds", ".pcx", ".sgi", ".icns", ".heic", ".heif", ".jxl",
    ".svg",
}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
LIST_SUFFIXES = (".parquet", ".csv")
PATH_COLUMNS = ("path", "uri", "url", "file", "filename", "image_path")


@dataclass
class Item:
    uri: str  # display form: file path, or "<tar>!/<member>"
    source: str  # absolute file path, or the tar's absolute path
    member: str | None  # tar member name
    relpath: str  # relative to the folder / member name / as listed
    data: bytes | None = None  # tar members carry their bytes (workers cannot seek into a stream)
    reason: str | None = None  # set when the item is rejected before decoding
    detail: str = ""


def source_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(LIST_SUFFIXES):
        return "list"
    raise UserError(
        f"unsupported source {path}: give a folder, a WebDataset tar shard ({', '.join(TAR_SUFFIXES)}) "
        "or a .parquet/.csv list of paths"
    )


def iter_source(path: Path, stats: dict[str, int]) -> Iterator[Item]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"source does not exist: {path}")
    kind = source_kind(path)
    if kind == "folder":
        yield from iter_folder(path, stats)
    elif kind == "tar":
        yield from iter_tar(path, stats)
    else:
        yield from iter_list(path, stats)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def iter_folder(root: Path, stats: dict[str, int]) -> Iterator[Item]:
    root_abs = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root_abs, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        # Symlinked directories are not walked (os.walk lists them as dirs but does not follow them);
        # record them instead of losing them without a word.
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                dirnames.remove(d)
                target = p.resolve()
                reason = "symlink-escape" if not _inside(target, root_abs) else "symlink-directory"
                yield Item(str(p), str(p), None, str(p.relative_to(root_abs)), reason=reason,
                           detail=f"directory link to {target} is not followed")
        for name in sorted(filenames):
            p = here / name
            rel = str(p.relative_to(root_abs))
            if p.is_symlink():
                target = p.resolve()
                if not target.exists():
                    yield Item(str(p), str(p), None, rel, reason="broken-symlink", detail=f"points to {target}")
                    continue
                if not _inside(target, root_abs):
                    yield Item(str(p), str(p), None, rel, reason="symlink-escape",
                               detail=f"points outside the source folder, to {target}")
                    continue
            if name.startswith("."):
                stats["hidden_files_skipped"] = stats.get("hidden_files_skipped", 0) + 1
                continue
            try:
                regular = stat.S_ISREG(p.stat().st_mode)
            except OSError as exc:
                yield Item(str(p), str(p), None, rel, reason="unreadable", detail=str(exc))
                continue
            if not regular:  # a FIFO or device would block or stream forever when read
                yield Item(str(p), str(p), None, rel, reason="special-file", detail="not a regular file")
                continue
            yield Item(str(p), str(p), None, rel)


def _unsafe_member(name: str) -> str | None:
    pure = PurePosixPath(name)
    if name.startswith("/") or pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in pure.parts:
        return "'..' in path"
    return None


def iter_tar(path: Path, stats: dict[str, int]) -> Iterator[Item]:
    tar_abs = str(path.resolve())
    try:
        # Streaming mode: one pass, bounded memory, works for .tar and compressed tars alike.
        with tarfile.open(tar_abs, "r|*") as tf:
            for m in tf:
                uri = f"{tar_abs}!/{m.name}"
                unsafe = _unsafe_member(m.name)
                if unsafe:
                    yield Item(uri, tar_abs, m.name, m.name, reason="unsafe-tar-path", detail=unsafe)
                    continue
                if m.issym() or m.islnk():
                    yield Item(uri, tar_abs, m.name, m.name, reason="tar-link-member",
                               detail=f"link to {m.linkname!r} is not followed")
                    continue
                if not m.isfile():
                    continue  # directories and devices carry no image
                if Path(m.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    # WebDataset side files of a sample (.json, .cls, .txt): counted, not images.
                    stats["tar_sidecar_members"] = stats.get("tar_sidecar_members", 0) + 1
                    continue
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                yield Item(uri, tar_abs, m.name, m.name, data=data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Item(tar_abs, tar_abs, None, path.name, reason="unreadable-tar",
                   detail=f"{type(exc).__name__}: {exc} (members before this point were kept)")


def _list_paths(path: Path) -> list[str]:
    if path.name.lower().endswith(".parquet"):
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"cannot read parquet list {path}: {exc}") from None
        cols = [c for c in PATH_COLUMNS if c in table.column_names]
        if not cols:
            raise UserError(f"{path}: no path column (one of {', '.join(PATH_COLUMNS)}) in {table.column_names}")
        return [v for v in table.column(cols[0]).to_pylist()]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    cols = [header.index(c) for c in PATH_COLUMNS if c in header]
    if cols:
        return [r[cols[0]] if len(r) > cols[0] else "" for r in rows[1:]]
    return [r[0] if r else "" for r in rows]  # no header: the first column holds paths


def _listed_path(entry: str, base: Path) -> Path:
    """The absolute path a list entry names; a relative one is relative to the list's folder."""
    p = Path(entry.removeprefix("file://"))
    return Path(os.path.abspath(p if p.is_absolute() else base / p))


def listed_files_fingerprint(path: Path) -> str:
    """Path, size and mtime of every local file a list source names, in list order (a missing one as such).

    A list's own bytes stay the same when an image it names is replaced; cache keys add this to see that."""
    base = Path(path).resolve().parent
    h = hashlib.sha256()
    for raw in _list_paths(Path(path)):
        entry = raw.strip() if isinstance(raw, str) else ""
        if not entry or ("://" in entry and not entry.startswith("file://")):
            continue  # nothing on this machine behind it: the list's own bytes say all there is
        p = _listed_path(entry, base)
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return "listed:" + h.hexdigest()


def iter_list(path: Path, stats: dict[str, int]) -> Iterator[Item]:
    base = path.resolve().parent
    seen: set[str] = set()
    for i, raw in enumerate(_list_paths(path)):
        entry = (raw or "").strip() if isinstance(raw, str) else raw
        if not entry:
            yield Item(f"{path}#row{i}", str(path), None, f"row {i}", reason="empty-list-entry",
                       detail=f"row {i} of {path.name} has no path")
            continue
        if "://" in entry and not entry.startswith("file://"):
            yield Item(entry, entry, None, entry, reason="remote-uri",
                       detail="remote URLs are not downloaded by ingest; fetch them first (e.g. img2dataset)")
            continue
        entry = entry.removeprefix("file://")
        p_abs = _listed_path(entry, base)
        key = str(p_abs)
        if key in seen:
            yield Item(key, key, None, entry, reason="duplicate-entry", detail=f"listed again at row {i}")
            continue
        seen.add(key)
        if not p_abs.exists():
            yield Item(key, key, None, entry, reason="missing-file", detail="listed path does not exist")
            continue
        yield Item(key, key, None, entry)
