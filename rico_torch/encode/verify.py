"""``verify``: check an encoded dataset against its manifest and, optionally, its sources.

Without sources: ``keys.index`` must be sound (structure and content digest), every value must
decode, match the manifest's dtype and shape for the bands of its source (its row range),
match its recorded per-key digest, and the keys, patch count and order-independent content
hash must equal the manifest's. With sources: the sources are re-read in parallel and every
value must equal what encoding them gives now (which the tests tie to rasterio's read); a
shard is compared with its part of the sources, and patches the manifest lists as skipped
are expected absent, as are windows the reader skips as nodata (too few valid cells: counted, not
listed, in the manifest) if they are absent and as many as the manifest counts. An LMDB without a manifest (rico-hdl's output) is decoded value by value
and, given the dataset and its sources, compared with them. A corrupt LMDB (a page LMDB
cannot read) is a problem naming data.mdb, not a crash.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import lmdb

from ..catalog import encode_command, get_dataset
from ..errors import FormatError, InputError, TargetError
from ..format import parse_header
from .discover import discover, select_shard
from ..manifest import Manifest, decode_keys, digest64, encoder_running
from .read import value_digest
from .writer import MANIFEST, NODATA_PER_SOURCE, TASK_SIZE, encode_task, progress_bar, read_manifest, worker_pool


@dataclass
class VerifyReport:
    target: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    content_hash: str = ""
    sources_compared: int = 0
    skipped_at_encode: int = 0  # source patches the manifest lists as skipped: expected absent
    nodata: int = 0  # source windows the reader skips as nodata, absent from the LMDB as they should be
    has_manifest: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = f"{self.checked:,} values checked"
        if self.sources_compared:
            what += f", {self.sources_compared:,} compared with their sources"
        if self.skipped_at_encode:
            what += f", {self.skipped_at_encode:,} skipped at encode time (listed in {MANIFEST})"
        if self.nodata:
            what += f", {self.nodata:,} skipped as nodata (too few valid cells, as at encode time)"
        if not self.has_manifest:
            what += f"; no {MANIFEST} (as rico-hdl writes), so no recorded digests, key list or count to check"
        if self.ok:
            return f"{self.target}: OK ({what}; content hash {self.content_hash})"
        return f"{self.target}: {len(self.problems)} problem(s) ({what})"


def verify(
    target: Path,
    roots: dict[str, Path] | None = None,
    num_workers: int = 0,
    quiet: bool = False,
    dataset: str | None = None,
    discovered: list | None = None,
) -> VerifyReport:
    """Verify ``target``; ``roots`` (source name -> directory) adds the comparison with sources.

    ``dataset`` names the dataset of an LMDB without a manifest (rico-hdl's output); it is
    needed only with ``roots``. Without a manifest every value is decoded and, with ``roots``,
    compared with its source, but there are no recorded digests, keys or counts to check.
    ``discovered`` (patches found by the caller, e.g. scene windows) replaces the catalog's
    discovery of ``roots``: values are compared with what encoding those patches gives.
    """
    target = Path(target)
    if not (target / "data.mdb").exists():
        raise TargetError(f"{target}: no data.mdb here")
    manifest = read_manifest(target)
    if manifest is not None and not manifest.get("complete"):
        if encoder_running(target):
            raise TargetError(f"{target}: being written by another process (an encode holds encode.lock); verify it "
                              "once that encode is done")
        raise TargetError(f"{target}: the encode is not complete; finish it with `{encode_command(manifest, target)}`, "
                          "then verify")
    if manifest is not None:
        dataset = manifest["dataset"]
    elif roots and dataset is None:
        raise TargetError(f"{target}: no {MANIFEST}; name the dataset to compare with its sources")
    report = VerifyReport(target, has_manifest=manifest is not None)
    try:  # keys.index's structure and content digest, before anything trusts its columns
        for _, index in manifest.parts if manifest is not None else ():
            index.check()
    except FormatError as e:
        report.problems.append(str(e))
        return report
    stored_digests = _check_values(target, manifest, report, quiet, keep=discovered is not None or bool(roots))
    if stored_digests is None:  # the LMDB itself is corrupt: nothing past that can be checked
        return report
    if manifest is not None:
        if report.checked != manifest.get("patches"):
            report.problems.append(f"{report.checked} patches stored, manifest says {manifest.get('patches')}")
        if manifest.get("content_hash") and report.content_hash != manifest["content_hash"]:
            report.problems.append(
                f"content hash {report.content_hash} differs from the manifest's {manifest['content_hash']}")
    if discovered is not None:
        _compare_discovered(dataset, discovered, manifest, set(roots or ()), stored_digests, report, num_workers,
                            quiet)
    elif roots:
        _compare_sources(get_dataset(dataset), manifest, roots, stored_digests, report, num_workers, quiet)
    return report


class _Listed:
    """The manifest's keys in byte order (LMDB's), walked beside the LMDB's cursor: a key's row in
    the sidecar without a dict of every key."""

    def __init__(self, manifest: Manifest | None) -> None:
        self.parts = manifest.parts if manifest is not None else []
        if self.parts:
            self.ranges, index = self.parts[0]
            self.keys, self.sorter = index.columns["key"], index.columns["sorter"]
            self.digests = index.columns.get("digest")
            self.names, self.source = manifest.source_of_rows(0)
        self.at, self.missing = 0, []

    def row(self, raw: bytes) -> int:
        """The row of ``raw`` (keys come in increasing order), -1 where the manifest does not list it;
        keys passed over are recorded as missing."""
        if not self.parts:
            return -1
        while self.at < len(self.sorter):
            row = int(self.sorter[self.at])
            listed = self.keys[row]
            if listed == raw:
                self.at += 1
                return row
            if listed > raw:
                return -1
            self.missing.append(listed.decode(errors="replace"))
            self.at += 1
        return -1

    def rest(self) -> list[str]:
        """Listed keys the LMDB did not hold."""
        while self.parts and self.at < len(self.sorter):
            self.missing.append(self.keys[int(self.sorter[self.at])].decode(errors="replace"))
            self.at += 1
        return self.missing


def _check_values(target: Path, manifest: Manifest | None, report: VerifyReport, quiet: bool,
                  keep: bool = True) -> dict[str, int] | None:
    """Decode every value (and check it against the manifest and its sidecar): key -> digest
    (only with ``keep``, for a comparison with the sources; else empty), or None where LMDB
    itself fails (a corrupt page), which is reported as a problem naming data.mdb."""
    data = target / "data.mdb"
    listed = _Listed(manifest)
    manifest = manifest or {}
    bands = manifest.get("bands", {})
    open_sources = _open_sources(manifest.get("dataset"))
    stored_digests: dict[str, int] = {}
    total = 0
    key = None
    try:
        env = lmdb.open(str(target), readonly=True, lock=False, subdir=True, max_dbs=0)
    except lmdb.Error as e:
        report.problems.append(f"{data}: not a readable LMDB ({type(e).__name__}: {e})")
        return None
    bar = progress_bar(manifest.get("patches", 0), quiet)
    try:
        with env.begin(buffers=True) as txn:
            for raw_key, value in txn.cursor():
                raw = bytes(raw_key)
                key = raw.decode("utf-8", "replace")
                report.checked += 1
                bar.update(1)
                digest = value_digest(raw, bytes(value))
                total = (total + digest) % (1 << 256)
                if keep:
                    stored_digests[key] = digest
                row = listed.row(raw)
                if manifest and row < 0:
                    report.problems.append(f"{key}: key is not in the manifest")
                    continue
                try:
                    header = parse_header(value, key)
                except ValueError as e:
                    report.problems.append(f"{key}: {e}")
                    continue
                if manifest:
                    source = listed.names[listed.source[row]]
                    _check_header(key, header, bands.get(source, {}), report, exact=source not in open_sources)
                    if listed.digests is not None and digest64(digest) != int(listed.digests[row]):
                        report.problems.append(f"{key}: value differs from the one written (digest mismatch)")
    except lmdb.Error as e:
        where = f" after key {key!r}" if key is not None else ""
        report.problems.append(f"{data}: corrupt LMDB{where} ({type(e).__name__}: {e}); "
                               "the values past this point cannot be read")
        return None
    finally:
        bar.close()
        env.close()
    report.problems.extend(f"{k}: key listed in the manifest is missing" for k in listed.rest())
    report.content_hash = f"{total:064x}"
    return stored_digests


def _open_sources(dataset: str | None) -> set[str]:
    """The dataset's sources whose patches hold any of their bands (``Source.open_bands``)."""
    try:
        return {s.name for s in get_dataset(dataset).sources if s.open_bands} if dataset else set()
    except KeyError:
        return set()


def _check_header(key: str, header: dict, expected: dict, report: VerifyReport, exact: bool = True) -> None:
    """A value's bands, dtypes and shapes against the manifest's table for its source (with
    ``exact=False``, a subset of its bands: an ``open_bands`` source's patches differ)."""
    if set(header) != set(expected) if exact else not set(header) <= set(expected):
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


def _compare_sources(dataset, manifest, roots, stored_digests, report, num_workers, quiet) -> None:
    unknown = [name for name in roots if name not in {s.name for s in dataset.sources}]
    if unknown:
        raise InputError(unknown[0], f"is not a source of {dataset.name}")
    shard = (manifest or {}).get("shard")  # only the shard's share is listed past each source's walk
    discovered = discover(dataset, roots, (shard["index"], shard["count"]) if shard else None)
    _compare_discovered(dataset.name, discovered, manifest, set(roots), stored_digests, report, num_workers, quiet)


def _compare_discovered(dataset_name, discovered, manifest, roots, stored_digests, report, num_workers, quiet) -> None:
    manifest = manifest or {}
    if manifest.get("shard"):  # a shard holds only its part of the sources
        discovered = select_shard(discovered, manifest["shard"]["index"], manifest["shard"]["count"])
    skipped = {s["key"] for s in manifest.get("skipped", [])}
    if manifest.get("excluded", {}).get("patches"):  # left out by the encode's --exclude lists: expected absent
        kept = set(decode_keys(manifest.key_array()))
        skipped |= {p.key for sp in discovered for p in sp.patches if p.key not in kept}
    report.skipped_at_encode = sum(p.key in skipped for sp in discovered for p in sp.patches)
    discovered = [replace(sp, patches=[p for p in sp.patches if p.key not in skipped]) for sp in discovered]
    tasks = [
        (dataset_name, sp.source.name, sp.patches[i : i + TASK_SIZE], True)
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
    nodata = dict.fromkeys((sp.source.name for sp in discovered), 0)  # source -> windows skipped as nodata now
    try:
        for source, chunk in results:
            for key, digest, error, skipped_as_nodata in chunk:
                seen.add(key)
                bar.update(1)
                nodata[source] += skipped_as_nodata
                if skipped_as_nodata and key not in stored_digests:  # absent, as the encode left it out
                    report.nodata += 1
                    continue
                report.sources_compared += 1
                if skipped_as_nodata:
                    report.problems.append(f"{key}: in the LMDB but its source is skipped as nodata now: {error}")
                elif error is not None:
                    report.problems.append(f"{key}: source unreadable: {error}")
                elif key not in stored_digests:
                    report.problems.append(f"{key}: in the sources but not in the LMDB")
                elif stored_digests[key] != digest:
                    report.problems.append(f"{key}: stored value differs from its source")
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    if manifest:
        expected = decode_keys(manifest.key_array([s for s in manifest.sources() if s in roots]))
    else:  # no record of which source a key came from: every key must be in the given sources
        expected = list(stored_digests)
    report.problems.extend(f"{k}: in the LMDB but not in the sources" for k in expected if k not in seen)
    counted = manifest.get(NODATA_PER_SOURCE, {})  # absent from manifests of earlier versions (they list them)
    report.problems.extend(f"{source}: {n:,} windows are skipped as nodata now, {MANIFEST} counts {counted[source]:,}"
                           for source, n in nodata.items() if source in counted and n != counted[source])


def _digests_task(args) -> tuple[str, list[tuple[str, int | None, str | None, bool]]]:
    """Encode patches as the encoder would and return only their digests (small to send back):
    (source, [(key, digest, why it was skipped, whether as nodata)])."""
    batch = encode_task(*args, values=False)
    return args[1], [*((key, digest, None, False) for key, digest in zip(batch.keys, batch.full)),
                     *((key, None, why, nodata) for key, why, nodata in batch.skipped)]


def print_report(report: VerifyReport, limit: int = 50) -> None:
    for line in report.problems[:limit]:
        print(f"  {line}", file=sys.stderr)
    if len(report.problems) > limit:
        print(f"  ... and {len(report.problems) - limit} more", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
