"""``python -m rico_torch.encode``: one subcommand per dataset, built from the catalog."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..catalog import DATASETS, Dataset, get_dataset
from ..cli_errors import report
from ..errors import ConfigError, InputError, UserError
from ..manifest import Entries, require_lmdb, upgrade
from . import hashes
from .discover import discover, printable
from .options import DEMO_TMP_PREFIX, demo_fit_command, parse_shard
from .writer import EncodeResult, TargetLock, encode_dataset

DESCRIPTION = """\
Convert a remote-sensing patch dataset into one LMDB whose values are safetensors dicts
(band name -> array), value-identical to the source pixels and in the format rico-hdl writes.
Run once; train from the LMDB with rico_torch.data. Re-running the same command after an
interruption resumes and finishes the job."""


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-dir", required=True, type=Path, help="directory for data.mdb and manifest.json")
    p.add_argument("--num-workers", type=int, default=default_workers(),
                   help="reader processes (default: all cores, %(default)s here); 0 reads in this process")
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, a line every 60 s in a "
                   "log) or summary (errors still go to stderr)")


def _add_dataset(sub, dataset: Dataset) -> None:
    p = sub.add_parser(
        dataset.name,
        aliases=list(dataset.aliases),
        help=dataset.description,
        description=dataset.description,
        epilog=f"example:\n  {dataset.example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options = _options(dataset)
    for option, sources in options.items():
        p.add_argument(option, *sources[0].aliases, dest=_option_dest(dataset, option), type=Path,
                       required=len(options) == 1, metavar="DIR", help=sources[0].help)
    groups: dict[str, list[str]] = {}
    for source in dataset.sources:
        if source.group:
            groups.setdefault(source.group, []).append(source.name)
    for group, names in groups.items():
        p.add_argument(f"--{group}", dest=f"group_{group}", nargs="+", choices=names, metavar=group.upper(),
                       help=f"which of {', '.join(names)} to encode (default: each whose folder is there)")
    _common(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an LMDB already in the target instead of resuming or refusing")
    p.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="write only shard I of N (0-based; keys with crc32(key) %% N == I), e.g. one job of "
                        "a batch array; read the N target directories together as one dataset")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip patches with missing or invalid bands (listed in the manifest and summary) "
                        "instead of stopping at the first")
    p.add_argument("--source-hashes", type=Path, metavar="CSV",
                   help="record this hash list's SHA-256 in the manifest (a CSV of `hash-sources`, or one published "
                        "for the dataset); verify checks it")
    for flag, kwargs in dataset.options:
        p.add_argument(flag, **kwargs)
    p.set_defaults(dataset=dataset.name)


def _options(dataset: Dataset) -> dict[str, list]:
    """The dataset's source options and the sources each one gives (several may share one)."""
    options: dict[str, list] = {}
    for source in dataset.sources:
        options.setdefault(source.option, []).append(source)
    return options


def _option_dest(dataset: Dataset, option: str) -> str:
    sources = _options(dataset)[option]
    return f"source_{sources[0].name}" if len(sources) == 1 else f"dir_{option[2:].replace('-', '_')}"


def expand_root(dataset: Dataset, option: str, root: Path, chosen: set[str] | None = None) -> dict[str, Path]:
    """Source name -> root for a directory given to ``option``: the option's one source, or for
    sources that share it (each in its ``subdir``) those ``chosen`` (default: those present).

    Raises:
        InputError: none of the sharing sources' folders is there.
    """
    sources = _options(dataset)[option]
    if len(sources) == 1 and not sources[0].subdir:
        return {sources[0].name: root}
    if chosen is not None:
        return {s.name: root / s.subdir for s in sources if s.name in chosen}
    roots = {s.name: root / s.subdir for s in sources if (root / s.subdir).is_dir()}
    if not roots:
        folders = ", ".join(f"{s.subdir}/" for s in sources)
        raise InputError(printable(root), f"holds none of {dataset.title}'s folders ({folders})")
    return roots


def source_roots(dataset: Dataset, args: argparse.Namespace) -> dict[str, Path]:
    """Source name -> input directory, from the encode subcommand's options (and selectors)."""
    roots: dict[str, Path] = {}
    for option, sources in _options(dataset).items():
        given = getattr(args, _option_dest(dataset, option))
        if given is None:
            continue
        chosen = None
        for group in {s.group for s in sources if s.group}:
            picked = getattr(args, f"group_{group}", None)
            if picked is not None:  # a group not picked from keeps its default: those present
                chosen = (chosen or set()) | set(picked)
        if chosen is not None:  # sources of groups left at their default: those present
            for s in sources:
                if s.group and getattr(args, f"group_{s.group}", None) is None and (given / s.subdir).is_dir():
                    chosen.add(s.name)
        roots.update(expand_root(dataset, option, given, chosen))
    return roots


def copy_side_files(dataset: Dataset, base: Path, target: Path) -> list[Path]:
    """Copy the dataset's side files (``Dataset.side_files`` globs below ``base``) into ``target``
    at the same relative paths, each replaced atomically."""
    copied = []
    for pattern in dataset.side_files:
        for path in sorted(base.glob(pattern)):
            if not path.is_file():
                continue
            dest = target / path.relative_to(base)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
            copied.append(dest)
    return copied




def build_parser(prog: str = "python -m rico_torch.encode") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog="examples:\n" + "\n".join(f"  {d.example}" for d in DATASETS.values())
        + "\n  python -m rico_torch.encode demo --target-dir demo-lmdb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="DATASET")
    for dataset in DATASETS.values():
        _add_dataset(sub, dataset)
    demo = sub.add_parser(
        "demo",
        help="encode a small synthetic BigEarthNet (real layout) to see the tool work without downloads",
        description="Write a small synthetic BigEarthNet v2 dataset (S1, S2 and reference maps in the "
        "real layout) to a temporary folder and encode it into --target-dir.",
        epilog="example:\n  python -m rico_torch.encode demo --target-dir demo-lmdb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--patches", type=int, default=64, help="S1/S2 patch pairs to generate (default %(default)s)")
    _common(demo)
    demo.add_argument("--overwrite", action="store_true", help="replace an LMDB already in the target")
    demo.set_defaults(dataset="demo", skip_invalid=False)
    verify = sub.add_parser(
        "verify",
        help="check an encoded dataset: every value decodes and matches the manifest (and the sources, if given)",
        description="Check that every value decodes and matches the manifest's dtype, shape, per-key digest, "
        "key set, patch count and content hash. With source directories (the options the encode took), "
        "re-read the sources in parallel and compare every value. An LMDB without manifest.json (rico-hdl's "
        "output) has every value decoded, and compared with its sources if given. Lists every mismatch; "
        "exit code 1 if any.",
        epilog="examples:\n  python -m rico_torch.encode verify --target-dir encoded-bigearthnet\n"
        "  python -m rico_torch.encode verify --target-dir encoded-eurosat --dataset-dir EuroSAT_MS\n"
        "  python -m rico_torch.encode verify --target-dir rico-hdl-eurosat --dataset eurosat-ms --dataset-dir EuroSAT_MS",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option, (aliases, helps) in _verify_options().items():
        verify.add_argument(option, *aliases, dest=_verify_dest(option), type=Path, metavar="DIR",
                            help=f"compare with the sources ({' / '.join(helps)})")
    verify.add_argument("--source-hashes", type=Path, metavar="CSV",
                        help="the hash list the encode recorded (default: the path the manifest names); with source "
                        "folders, their GeoTIFFs are hashed and compared with it too")
    verify.add_argument("--dataset", dest="verify_dataset", metavar="NAME",
                        help="the dataset of an LMDB without manifest.json (rico-hdl's output), needed to compare "
                        f"it with sources where the options do not tell ({', '.join(DATASETS)})")
    _common(verify)
    verify.set_defaults(dataset="verify")
    verify.add_argument("--source", dest="verify_source", type=Path, metavar="PATH",
                        help="compare a cube encode with its source (the NetCDF/Zarr cube or GeoTIFF folder it was "
                        "encoded from)")
    from ..cube.encode import add_parser as add_cube_parser
    from ..scenes.chipper import add_parser as add_scenes_parser
    from .info import add_info_parser

    add_scenes_parser(sub, _common)
    add_cube_parser(sub, _common)
    add_info_parser(sub)
    for name, what, description in (
        ("upgrade", "rewrite a manifest.json written before keys.index (per-key facts inside) in the current layout "
         "(one-way: the old manifest is kept as manifest.json.v1)",
         "Move the per-key facts (keys, digests, labels, scene windows) of a manifest.json written by an earlier "
         "rico_torch into keys.index beside it; data.mdb is not touched. Earlier manifests are read correctly "
         "without this, but parsed whole on every open; after it, opening maps keys.index instead. One-way: a "
         "rico_torch older than keys.index cannot read the upgraded target; the earlier manifest is kept as "
         "manifest.json.v1 (move it back over manifest.json to undo). A target in the current layout whose "
         "keys.index is missing or damaged is repaired (see repair). An aligned stack encoded with --group-by time "
         "(every date in each window) before its dates were recorded as a cube's gets them, from manifest.json "
         "alone."),
        ("repair", "rebuild a missing, foreign or damaged keys.index from data.mdb and manifest.json",
         "Check keys.index (structure and content digest) and, where it is missing, belongs to another encode or "
         "is damaged, rebuild it from data.mdb and manifest.json: keys, each key's source, value digests, labels "
         "that follow from keys, scene window offsets. data.mdb is read, never written; the values must match the "
         "manifest's count and content hash. Within a source the rows come in key order. Columns that follow from "
         "the sources (BigEarthNet v1's label bits) need the encode re-run instead: re-running the encode of a "
         "complete target rebuilds keys.index exactly as it was written. Like upgrade, it records the dates of an "
         "aligned stack encoded before they were."),
    ):
        command = sub.add_parser(name, help=what, description=description,
                                 epilog=f"example:\n  python -m rico_torch.encode {name} encoded-eurosat",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("target", type=Path, metavar="LMDB_DIR", help="directory holding data.mdb and manifest.json")
        command.set_defaults(dataset=name)
    hasher = sub.add_parser(
        "hash-sources",
        help="write the SHA-256 of every GeoTIFF below a folder as the BigEarthNet pipeline's tiff-hasher does",
        description="Write OUTPUT: the line `name,hash-sha256`, then `<file stem>,<hex sha256>` for every .tif/.tiff "
        "below DIR (recursively), sorted by name; and OUTPUT.sha256 holding the CSV's own hex SHA-256. Compare it "
        "with a published list before encoding; `encode ... --source-hashes OUTPUT` records it, verify checks it.",
        epilog="example:\n  python -m rico_torch.encode hash-sources BigEarthNet-v1.0 --output hashes.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hasher.add_argument("source", type=Path, metavar="DIR", help="folder holding the GeoTIFFs")
    hasher.add_argument("--output", type=Path, required=True, metavar="CSV", help="the hash list to write")
    hasher.set_defaults(dataset="hash-sources")
    from .pickled import add_parser as add_pickled_parser

    add_pickled_parser(sub, _common)
    return parser


def _verify_options() -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """Every source option of every dataset (verify takes them all): option -> (aliases, helps)."""
    options: dict[str, tuple[tuple[str, ...], list[str]]] = {}
    for dataset in DATASETS.values():
        for source in dataset.sources:
            helps = options.setdefault(source.option, (source.aliases, []))[1]
            if source.help not in helps:
                helps.append(source.help)
    return options


def _verify_dest(option: str) -> str:
    return f"verify_{option[2:].replace('-', '_')}"


def verify_dataset(args: argparse.Namespace, manifest: dict | None) -> tuple[Dataset | None, dict[str, Path]]:
    """The dataset being verified and its source roots from the given source options.

    Raises:
        ConfigError: a source option that is not one of the dataset's, ``--dataset`` naming
            another dataset than the manifest, or sources for an LMDB without a manifest whose
            dataset the options do not tell.
    """
    given = {o: getattr(args, _verify_dest(o)) for o in _verify_options() if getattr(args, _verify_dest(o)) is not None}
    name = args.verify_dataset
    try:
        named = get_dataset(name) if name is not None else None
    except KeyError:
        raise ConfigError(f"--dataset {name}: unknown dataset; known: {', '.join(DATASETS)}") from None
    if manifest is not None:
        dataset = get_dataset(manifest["dataset"])
        if named is not None and named.name != dataset.name:
            raise ConfigError(f"--dataset {name}: the manifest says this is {dataset.name}")
    elif named is not None or not given:
        dataset = named
    else:
        # a dataset whose facts only a manifest holds (BigEarthNet v1's labels: `prepare`) is never without one
        fits = [d for d in DATASETS.values() if set(given) <= {s.option for s in d.sources} and d.prepare is None]
        if len(fits) != 1:
            which = " or ".join(d.name for d in fits) or "no single dataset"
            raise ConfigError(f"{args.target_dir}: no manifest.json, and {', '.join(given)} fit {which}; "
                              "give --dataset NAME")
        dataset = fits[0]
    if dataset is None:
        return None, {}
    options = _options(dataset)
    roots: dict[str, Path] = {}
    for option, root in given.items():
        if option not in options:
            raise ConfigError(f"{option} is not a source option of {dataset.name} (its options: {', '.join(options)})")
        encoded = set((manifest or {}).get("counts", {})) if manifest is not None else None
        roots.update(expand_root(dataset, option, root, encoded))
    return dataset, roots


def run_verify(args: argparse.Namespace) -> int:
    from .hashes import check as check_hashes
    from .verify import print_report, read_manifest, verify

    manifest = read_manifest(args.target_dir)
    if manifest is not None and manifest.get("dataset") == "scenes":  # windows of scenes: not in the catalog
        from ..scenes.chipper import verify_scenes

        report = verify_scenes(args.target_dir, args.verify_dataset_dir, args.num_workers, args.quiet)
        print_report(report)
        return 0 if report.ok else 1
    if manifest is not None and manifest.get("dataset") == "cube":  # windows of a datacube: not in the catalog
        from ..cube.encode import verify_cube

        report = verify_cube(args.target_dir, args.verify_source, args.num_workers, args.quiet)
        print_report(report)
        return 0 if report.ok else 1
    if args.verify_source is not None:
        raise ConfigError(f"--source: {args.target_dir} is not a cube encode; give the dataset's source options")
    dataset, roots = verify_dataset(args, manifest)
    report = verify(args.target_dir, roots, num_workers=args.num_workers, quiet=args.quiet,
                    dataset=dataset.name if dataset is not None else None)
    if manifest is not None and "source_hashes" in manifest:
        report.problems += check_hashes(manifest["source_hashes"], args.source_hashes, list(roots.values()))
    elif args.source_hashes is not None:
        report.problems.append(f"{args.target_dir}: the manifest records no source hashes (encode with "
                               "--source-hashes to record them)")
    print_report(report)
    return 0 if report.ok else 1


def run_encode(dataset: Dataset, roots: dict[str, Path], args: argparse.Namespace,
               base: Path | None = None) -> EncodeResult:
    """Encode ``roots``; ``base``: the directory the sources share (side files, manifest extras)."""
    shard = getattr(args, "shard", None)
    given_hashes = getattr(args, "source_hashes", None)
    recorded = {"source_hashes": hashes.manifest_entry(given_hashes)} if given_hashes is not None else {}
    discovered = discover(dataset, roots, shard)
    extra = dataset.manifest_extra(discovered, base) if dataset.manifest_extra and base is not None else None
    extension = [Entries(extra), Entries(recorded)]
    if dataset.prepare is not None:
        discovered, facts = dataset.prepare(discovered, args)
        extension.append(facts)
    result = encode_dataset(
        dataset,
        discovered,
        args.target_dir,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        skip_invalid=args.skip_invalid,
        quiet=args.quiet,
        sources_info={k: str(v.resolve()) for k, v in roots.items()},
        shard=shard,
        extension=extension,
    )
    if base is not None:
        copy_side_files(dataset, base, args.target_dir)
    return result


def run_demo(args: argparse.Namespace) -> EncodeResult:
    from ..synthetic import make_bigearthnet

    dataset = get_dataset("bigearthnet")
    with tempfile.TemporaryDirectory(prefix=DEMO_TMP_PREFIX) as tmp:
        files = make_bigearthnet(Path(tmp), patches=args.patches)
        roots = {"s1": files.s1_dir, "s2": files.s2_dir, "reference_maps": files.reference_maps_dir}
        if not args.quiet:
            print(f"generated {args.patches:,} synthetic BigEarthNet S1/S2 pairs with reference maps in a temporary "
                  "folder (removed once encoded)", file=sys.stderr)
        result = run_encode(dataset, roots, args)
    write_demo_metadata(args.target_dir, files.pairs, files.labels)
    return result


def write_demo_metadata(target: Path, pairs, labels) -> Path:
    """The demo's ``metadata.parquet`` beside its ``data.mdb``: the official BigEarthNet v2 schema,
    each patch's labels the classes of its reference map, splits dealt train/validation/test."""
    from ..synthetic import make_bigearthnet_metadata

    path = target / "metadata.parquet"
    tmp = target / "metadata.parquet.tmp"
    make_bigearthnet_metadata(tmp, pairs, labels=labels)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def next_steps(target: Path, dataset_name: str, shard: tuple[int, int] | None = None) -> str:
    """The line after the summary: what to run next on the LMDB just written (a shard: on all of them)."""
    if dataset_name == "scenes":
        from ..data.store import Store
        from ..scenes.chipper import fit_suggestion

        fit = fit_suggestion(target, Store(target).manifest())
    elif dataset_name == "demo":
        fit = f"`{demo_fit_command(target)}` trains on it"
    elif dataset_name == "cube":
        from ..cube.encode import fit_command

        fit = f"`{fit_command(target)}` trains on it"
    else:
        fit = f"`{get_dataset(dataset_name).fit_command(target)}` trains on it"
    if shard is not None:  # one shard alone is a 1/N sample: train on the N target directories together
        every = f"'[{target}, ...]'"
        how = (f"`{get_dataset(dataset_name).fit_command(every)}`" if dataset_name in DATASETS
               else f"its fit command with lmdb_path {every}")
        fit = (f"once all {shard[1]} shards are written, {how} trains on them together (list every shard's target "
               "directory; one shard alone is a sample of the dataset)")
    return f"next: `python -m rico_torch.encode info {target}` describes it; {fit}"


def main(argv: list[str] | None = None, prog: str = "python -m rico_torch.encode") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.dataset == "info":
        from .info import run_info

        try:
            return run_info(args)
        except UserError as e:
            return report(e)
    if args.dataset == "hash-sources":
        try:
            count, digest = hashes.write_hashes(args.source, args.output)
        except UserError as e:
            return report(e)
        print(f"hashed {count:,} GeoTIFFs below {args.source} into {args.output} (its SHA-256 {digest} in "
              f"{args.output}.sha256)", file=sys.stderr)
        return 0
    if args.dataset == "convert-pickled":
        from .pickled import run as run_pickled

        return run_pickled(args)
    if args.dataset in ("upgrade", "repair"):
        from .repair import index_problem, repair

        try:
            with TargetLock(require_lmdb(args.target)):
                broken = index_problem(args.target)
                done = repair(args.target, broken) if args.dataset == "repair" or broken else upgrade(args.target)
                print(done, file=sys.stderr)
            return 0
        except UserError as e:
            return report(e)
    if args.num_workers < 0:
        print("error: --num-workers must be >= 0", file=sys.stderr)
        return 2
    try:
        if args.dataset == "verify":
            return run_verify(args)
        if args.dataset == "demo":
            result = run_demo(args)
        elif args.dataset == "scenes":
            from ..scenes.chipper import run as run_scenes

            result = run_scenes(args)
        elif args.dataset == "cube":
            from ..cube.encode import run as run_cube

            result = run_cube(args)
        else:
            dataset = get_dataset(args.dataset)
            roots = source_roots(dataset, args)
            if not roots:
                options = ", ".join(_options(dataset))
                print(f"error: {dataset.name}: give at least one of {options}", file=sys.stderr)
                return 2
            shared = [getattr(args, _option_dest(dataset, o)) for o, ss in _options(dataset).items() if len(ss) > 1]
            result = run_encode(dataset, roots, args, base=next((b for b in shared if b is not None), None))
    except ConfigError as e:  # a wrong argument: exit code 2, as argparse's own errors
        return 2 * report(e)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        if args.dataset == "verify":
            print("\nverify interrupted: nothing was changed; run it again to check the whole dataset", file=sys.stderr)
        else:
            print("\ninterrupted: committed patches are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
        print(next_steps(args.target_dir, args.dataset, getattr(args, "shard", None)), file=sys.stderr)
    nodata, invalid = result.nodata_and_invalid()
    if nodata and not args.quiet:
        print(f"skipped {nodata:,} patches as nodata, with fewer valid pixels than asked (counted in manifest.json: "
              "skipped_nodata)", file=sys.stderr)
    if invalid:
        print(f"skipped {len(invalid):,} invalid patches (listed in manifest.json):", file=sys.stderr)
        for s in invalid[:20]:
            print(f"  {s['reason']}", file=sys.stderr)
    return 0
