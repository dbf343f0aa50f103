"""``python -m rico_torch.encode repair TARGET``: rebuild a missing, foreign or damaged ``keys.index``.

Everything the sidecar holds follows from ``data.mdb`` and ``manifest.json``: the keys (every key
in the LMDB), each key's source (its bands against the manifest's band table, the catalog's key
rule where bands do not tell; a scene window's key names its scene), the digests (of the values),
labels that follow from keys (a class-folder dataset's ``<class>_<n>`` keys) and window offsets
(``<scene>_<row>_<col>``; ``<name>_<t>_<row>_<col>`` of windows over time, and time 0 for every
window of a full aligned stack, ``--group-by time`` without ``--patch-time``, whose missing cube
facts it records as ``upgrade`` does). Within a source the rows come in key order (an encode
writes them in source path order; no reader depends on it). The values are checked against the manifest's
count and content hash first, so the rebuilt index describes the data the manifest does. Only
``keys.index`` and the ``index`` entry of ``manifest.json`` are written; ``data.mdb`` is read, never
written. Re-running the encode of a complete target rebuilds it exactly as written instead (write
order, and any column from the sources, e.g. BigEarthNet v1's label bits), from the committed
values and the sources' listing.
"""

from __future__ import annotations

import re
from pathlib import Path

import lmdb
import numpy as np

from ..catalog import get_dataset
from ..cube.plan import key_offsets
from ..errors import FormatError, TargetError
from ..format import parse_header
from ..manifest import INDEX, LEGACY_FIELDS, MANIFEST, build_columns, digest64, read, read_json, require_lmdb, \
    upgrade_stack, write
from ..scenes.chipper import recorded_stack_facts
from .read import value_digest

_SCENE_WINDOW = re.compile(rb"^(?P<scene>.+)_(?P<row>\d+)_(?P<col>\d+)$")
_TRAILING_NUMBER = re.compile(r"_?\d+$")  # a class-folder key: <class>[_]<n>
#: The columns rebuilt from data.mdb and the manifest alone (others, e.g. BigEarthNet v1's label
#: bits, come from the sources: re-running the encode rebuilds them).
REBUILT = ("key", "sorter", "digest", "label", "time", "row", "col")


def index_problem(target: Path, digest: bool = True) -> str | None:
    """Why the target's ``keys.index`` cannot be trusted (missing, foreign, damaged, ranges that do
    not tile), None where it is sound or the manifest keeps its keys itself (earlier layout);
    ``digest``: check the content digest too, whatever the sidecar's size."""
    try:
        manifest = read(target)
        for _, index in (manifest.parts if manifest is not None else ()):
            index.check() if digest else index.columns
    except FormatError as e:
        return str(e)
    return None


def repair(target: str | Path, problem: str | None = None) -> str:
    """Rebuild ``target``'s ``keys.index`` (see the module doc); the line saying what was done.
    ``problem``: why it is rebuilt, where the caller found out already."""
    target = require_lmdb(target)
    facts = read_json(target, error=TargetError)
    if facts is None:
        raise TargetError(f"{target}: no {MANIFEST} here (an LMDB rico-hdl wrote has no {INDEX} to repair)")
    if any(f in facts for f in LEGACY_FIELDS):
        return f"{target}: {MANIFEST} keeps its keys itself (earlier layout); nothing to repair"
    if not facts.get("complete"):
        raise TargetError(f"{target}: the encode is not complete; re-run its command to finish it (that writes "
                          f"{INDEX})")
    problem = problem or index_problem(target)
    if problem is None:
        return upgrade_stack(target, read(target)) or \
            f"{target}: {INDEX} is sound (content digest checked); nothing to repair"
    beyond = [c for c in facts.get("index", {}).get("columns", ()) if c not in REBUILT]
    if beyond:
        raise TargetError(f"{target}: {INDEX}'s {', '.join(beyond)} columns follow from the sources, not data.mdb; "
                          f"re-run the encode command (its sources at hand) to rebuild it ({problem})")
    cube = recorded_stack_facts(facts)  # a full stack encoded before its cube facts were recorded
    if cube is not None:
        facts["cube"] = cube
    ranges, columns = rebuild_columns(target, facts)
    write(target, facts, ranges, columns)
    return rebuilt_line(target, f"data.mdb and {MANIFEST}", len(columns["key"]), problem)


def rebuilt_line(target: Path, source: str, keys: int, problem: str) -> str:
    """What a rebuild of ``keys.index`` says: from what, how many keys, what was wrong."""
    why = problem.split(": ", 1)[1].split(";")[0] if ": " in problem else problem
    return f"{target}: rebuilt {INDEX} from {source} ({keys:,} keys; it was: {why}); data.mdb untouched"


def rebuild_columns(target: Path, facts: dict) -> tuple[dict[str, tuple[int, int]], dict[str, np.ndarray]]:
    """(source -> row range, columns) of the values in ``target``'s data.mdb, checked against ``facts``."""
    counts, bands = facts.get("counts", {}), facts.get("bands", {})
    sources = list(counts) + [s for s in bands if s not in counts]
    source_of = _source_rule(facts, sources)
    keys: dict[str, list[bytes]] = {s: [] for s in sources}
    digests: dict[str, list[int]] = {s: [] for s in sources}
    total = 0
    env = lmdb.open(str(target), readonly=True, lock=False, subdir=True, max_dbs=0)
    try:
        with env.begin(buffers=True) as txn:
            for raw_key, value in txn.cursor():
                key = bytes(raw_key)
                try:
                    names = frozenset(parse_header(value, key))
                except ValueError as e:
                    raise TargetError(f"{target / 'data.mdb'}: {e}; it cannot be indexed") from None
                source = source_of(key, names)
                digest = value_digest(key, bytes(value))
                total = (total + digest) % (1 << 256)
                keys[source].append(key)
                digests[source].append(digest64(digest))
    except lmdb.Error as e:
        raise TargetError(f"{target / 'data.mdb'}: not a readable LMDB ({e}); re-encode with --overwrite") from None
    finally:
        env.close()
    found = {s: len(k) for s, k in keys.items() if k}
    if found != {s: n for s, n in counts.items() if n} or f"{total:064x}" != facts.get("content_hash"):
        raise TargetError(f"{target}: data.mdb holds other values than {MANIFEST} describes (counts {found}, "
                          f"manifest {counts}); re-encode with --overwrite")
    ranges, at = {}, 0
    for source in sources:
        ranges[source] = (at, at + len(keys[source]))
        at += len(keys[source])
    every = [k for s in sources for k in keys[s]]
    key_column = np.array(every, dtype=np.bytes_) if every else np.zeros(0, "S1")
    more = {}
    if "cube" in facts:  # windows described as a cube's: time, row and col offsets
        if facts.get("dataset") == "scenes" and not facts.get("chip", {}).get("patch_time"):
            offsets = key_offsets(key_column, 2)  # a full stack: <scene>_<row>_<col>, every window at date 0
            more["time"] = np.zeros(len(every), "<i4")
        else:
            offsets = key_offsets(key_column, 3)
            more["time"] = offsets[:, 0].astype("<i4")
        more["row"], more["col"] = offsets[:, -2].astype("<i4"), offsets[:, -1].astype("<i4")
    elif facts.get("dataset") == "scenes" and "chip" in facts:
        offsets = [_SCENE_WINDOW.match(k) for k in every]
        more["row"] = np.array([int(m["row"]) for m in offsets], "<i4")
        more["col"] = np.array([int(m["col"]) for m in offsets], "<i4")
    elif "label" in facts.get("index", {}).get("columns", ()) or _labels_from_keys(facts):
        classes = {c: i for i, c in enumerate(facts.get("classes", []))}
        more["label"] = np.array([classes.get(_TRAILING_NUMBER.sub("", k.decode()), -1) for k in every], "<i4")
    digest_column = np.array([d for s in sources for d in digests[s]], dtype="<u8")
    return ranges, build_columns(key_column, digest_column, **more)


def _labels_from_keys(facts: dict) -> bool:
    """Whether the dataset's labels are its class folders (its keys name their class)."""
    try:
        return bool(facts.get("classes")) and any(s.label_from_parent for s in get_dataset(facts["dataset"]).sources)
    except KeyError:
        return False


def _source_rule(facts: dict, sources: list[str]):
    """key, band names -> the key's source: the one whose bands the value holds (for a source of
    open bands, any of them); where several fit, the one whose key rule the key follows (a scene
    window: the scene its key names)."""
    tables = {s: frozenset(facts.get("bands", {}).get(s, {})) for s in sources}
    try:
        dataset = get_dataset(facts.get("dataset", ""))
        catalog = {s.name: s for s in dataset.sources}
    except KeyError:
        catalog = {}

    def source_of(key: bytes, names: frozenset) -> str:
        fits = [s for s in sources if names == tables[s]
                or (s in catalog and catalog[s].open_bands and names <= tables[s])]
        if len(fits) > 1:
            text = key.decode(errors="replace")
            window = _SCENE_WINDOW.match(key)
            fits = [s for s in fits if (window is not None and window["scene"].decode() == s)
                    or (s in catalog and catalog[s].matches_key(text))]
        if len(fits) != 1:
            what = "no source" if not fits else f"sources {', '.join(fits)}"
            raise TargetError(f"key {key.decode(errors='replace')!r} (bands {', '.join(sorted(names))}) fits {what} "
                              f"of {MANIFEST}; {INDEX} cannot be rebuilt, re-encode with --overwrite")
        return fits[0]

    return source_of
