"""Provenance hashes of source GeoTIFFs, as the BigEarthNet pipeline's ``tiff-hasher`` writes them.

``hashes.csv``: the line ``name,hash-sha256``, then ``<file stem>,<lowercase hex SHA-256 of the
file>`` for every ``.tif``/``.tiff`` below the folder (recursively), sorted by name, every line
ending in ``\\n``; beside it ``hashes.csv.sha256`` holding the hex SHA-256 of that CSV (no newline).
Diff a download's CSV against a published one before encoding; ``encode --source-hashes`` records
the CSV's hash in the manifest and ``verify`` checks it again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import InputError
from .discover import printable

HEADER = "name,hash-sha256\n"
_SUFFIXES = (".tif", ".tiff")
_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    """The lowercase hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    except OSError as e:
        raise InputError(printable(path), f"unreadable ({e.strerror})") from None
    return h.hexdigest()


def tiff_files(root: Path) -> dict[str, Path]:
    """stem -> path of every ``.tif``/``.tiff`` below ``root`` (symlinked folders followed).

    Raises:
        InputError: ``root`` is not a folder, or two files share a stem (the CSV names files by stem).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(printable(root), "input directory does not exist" if not root.exists() else
                         "input is not a directory")
    found: dict[str, Path] = {}
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            if name.lower().endswith(_SUFFIXES):
                path = Path(dirpath, name)
                stem = path.stem
                if stem in found:
                    first, second = sorted((printable(found[stem]), printable(path)))
                    raise InputError(second, f"file stem {stem!r} is not unique (also {first}); the hash list "
                                     "names files by stem")
                found[stem] = path
    return found


def hash_lines(root: Path) -> str:
    """The CSV text for the GeoTIFFs below ``root``."""
    files = tiff_files(root)
    return HEADER + "".join(f"{stem},{file_sha256(files[stem])}\n" for stem in sorted(files))


def write_hashes(root: Path, output: Path) -> tuple[int, str]:
    """Write ``output`` and ``output.sha256``; returns (files hashed, the CSV's hex SHA-256)."""
    text = hash_lines(root).encode()
    output = Path(output)
    digest = hashlib.sha256(text).hexdigest()
    for path, data in ((output, text), (output.with_name(output.name + ".sha256"), digest.encode())):
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            raise InputError(printable(path), f"cannot write the hash list ({e.strerror})") from None
    return text.count(b"\n") - 1, digest


def manifest_entry(csv: Path) -> dict:
    """What ``encode --source-hashes`` records: the CSV's file name and hex SHA-256."""
    csv = Path(csv)
    if not csv.is_file():
        raise InputError(printable(csv), "hash list does not exist")
    with open(csv, "rb") as f:
        if f.read(len(HEADER)) != HEADER.encode():
            raise InputError(printable(csv), f"not a hash list (its first line is not {HEADER.strip()!r})")
    return {"file": str(csv.resolve()), "sha256": file_sha256(csv)}


def check(recorded: dict, csv: Path | None, roots: list[Path]) -> list[str]:
    """Problems of an encode's recorded source hashes: the CSV (``csv``, else the recorded path) must
    have the recorded SHA-256, and with source folders every GeoTIFF below them must have its hash."""
    path = Path(csv if csv is not None else recorded.get("file", ""))
    if not path.is_file():
        return [f"{path}: the source hash list the manifest records is missing; give --source-hashes FILE"]
    got = file_sha256(path)
    if got != recorded.get("sha256"):
        return [f"{path}: SHA-256 {got} differs from the manifest's {recorded.get('sha256')} (another hash list)"]
    if not roots:
        return []
    listed = dict(line.split(",", 1) for line in path.read_text().splitlines()[1:] if "," in line)
    problems = []
    for root in roots:
        for stem, file in sorted(tiff_files(root).items()):
            want = listed.get(stem)
            if want is None:
                problems.append(f"{file}: not in the source hash list {path.name}")
            elif file_sha256(file) != want:
                problems.append(f"{file}: SHA-256 differs from the source hash list {path.name}")
    return problems
