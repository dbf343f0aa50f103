"""``verify``: check an encoded dataset against its manifest and, optionally, its sources.

Without sources: every value must decode, match the manifest's dtype and shape for its band,
match its recorded per-key digest, and the keys, patch count and order-independent content
hash must equal the manifest's. With sources: the sources are re-read in parallel and every
value must equal what encoding them gives now (which the tests tie to rasterio's read).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from ..catalog import get_dataset
from ..errors import InputError, TargetError
from ..format import parse_header
from .discover import discover
from .read import short_digest, value_digest
from .writer import MANIFEST, TASK_SIZE, encode_task, progress_bar, worker_pool


@dataclass
class VerifyReport:
    target: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    content_hash: str = ""
    sources_compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = f"{self.checked:,} values checked"
        if self.sources_compared:
            what += f", {self.sources_compared:,} compared with their sources"
        if self.ok:
            return f"{self.target}: OK ({what}; content hash {self.content_hash})"
        return f"{self.target}: {len(self.problems)} problem(s) ({what})"


def verify(target: Path, roots: dict[str, Path] | None = None, num_workers: int = 0, quiet: bool = False) -> VerifyReport:
    """Verify ``target``; ``roots`` (source name -> directory) adds the comparison with sources."""
    target = Path(target)
    manifest_path = target / MANIFEST
    if not (target / "data.mdb").exists():
        raise TargetError(f"{target}: no data.mdb here")
    if not manifest_path.exists():
        raise TargetError(f"{target}: no {MANIFEST}; verify checks datasets written by rico_torch")
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        raise TargetError(f"{target}: the encode is not complete; re-run the encode command to finish it")
    report = VerifyReport(target)
    source_of = {k: s for s, keys in manifest["keys"].items() for k in keys}
    digest_of = {k: d for s, keys in manifest["keys"].items() for k, d in zip(keys, manifest.get("digests", {}).get(s, []))}
    bands = manifest.get("bands", {})
    stored_digests: dict[str, int] = {}
    total = 0
    env = lmdb.open(str(target), readonly=True, lock=False, subdir=True, max_dbs=0)
    try:
        with env.begin(buffers=True) as txn:
            bar = progress_bar(manifest.get("patches", 0), quiet)
            for raw_key, value in txn.cursor():
                key = bytes(raw_key).decode("utf-8", "replace")
                report.checked += 1
                bar.update(1)
                digest = value_digest(bytes(raw_key), bytes(value))
                total = (total + digest) % (1 << 256)
                stored_digests[key] = digest
                if key not in source_of:
                    report.problems.append(f"{key}: key is not in the manifest")
                    continue
                try:
                    header = parse_header(value, key)
                except ValueError as e:
                    report.problems.append(f"{key}: {e}")
                    continue
                expected = bands.get(source_of[key], {})
                if set(header) != set(expected):
                    report.problems.append(f"{key}: bands {sorted(header)} differ from the manifest's {sorted(expected)}")
                for name, info in header.items():
                    want = expected.get(name)
                    if want is None:
                        continue
                    shape_ok = list(info.shape) == want["shape"] if want.get("shape") is not None else (
                        "x".join(map(str, info.shape)) in want.get("shapes", {}))
                    if info.dtype.name != want["dtype"] or not shape_ok:
                        report.problems.append(f"{key}: band {name} is {info.dtype.name} {list(info.shape)}, "
                                               f"manifest says {want['dtype']} {want.get('shape') or want.get('shapes')}")
                if key in digest_of and short_digest(digest) != digest_of[key]:
                    report.problems.append(f"{key}: value differs from the one written (digest mismatch)")
            bar.close()
    finally:
        env.close()
    missing = sorted(set(source_of) - set(stored_digests))
    report.problems.extend(f"{k}: key listed in the manifest is missing" for k in missing)
    if report.checked != manifest.get("patches"):
        report.problems.append(f"{report.checked} patches stored, manifest says {manifest.get('patches')}")
    report.content_hash = f"{total:064x}"
    if manifest.get("content_hash") and report.content_hash != manifest["content_hash"]:
        report.problems.append(f"content hash {report.content_hash} differs from the manifest's {manifest['content_hash']}")
    if roots:
        _compare_sources(manifest, roots, stored_digests, report, num_workers, quiet)
    return report


def _compare_sources(manifest, roots, stored_digests, report, num_workers, quiet) -> None:
    dataset = get_dataset(manifest["dataset"])
    unknown = [name for name in roots if name not in {s.name for s in dataset.sources}]
    if unknown:
        raise InputError(unknown[0], f"is not a source of {dataset.name}")
    discovered = discover(dataset, roots)
    tasks = [
        (dataset.name, sp.source.name, sp.patches[i : i + TASK_SIZE], True)
        for sp in discovered
        for i in range(0, len(sp.patches), TASK_SIZE)
    ]
    bar = progress_bar(sum(len(t[2]) for t in tasks), quiet)
    if num_workers > 0:
        pool = worker_pool(num_workers)
        results = pool.map(_digests_task, tasks)
    else:
        pool, results = None, map(_digests_task, tasks)
    seen = set()
    try:
        for chunk in results:
            for key, digest, error in chunk:
                seen.add(key)
                bar.update(1)
                report.sources_compared += 1
                if error is not None:
                    report.problems.append(f"{key}: source unreadable: {error}")
                elif key not in stored_digests:
                    report.problems.append(f"{key}: in the sources but not in the LMDB")
                elif stored_digests[key] != digest:
                    report.problems.append(f"{key}: stored value differs from its source")
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    compared_sources = set(roots)
    for source, keys in manifest["keys"].items():
        if source in compared_sources:
            report.problems.extend(f"{k}: in the LMDB but not in the sources" for k in keys if k not in seen)


def _digests_task(args) -> list[tuple[str, int, str | None]]:
    """Encode patches as the encoder would and return only their digests (small to send back)."""
    return [(key, digest, error) for key, _, digest, error in encode_task(*args)]


def print_report(report: VerifyReport, limit: int = 50) -> None:
    for line in report.problems[:limit]:
        print(f"  {line}", file=sys.stderr)
    if len(report.problems) > limit:
        print(f"  ... and {len(report.problems) - limit} more", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
