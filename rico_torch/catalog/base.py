"""Declarative dataset descriptions shared by the encoder and the data half.

A dataset is one or more *sources* (BigEarthNet has three: S1, S2 and the reference
maps). A source says how a patch is found on disk, how its LMDB key is formed, which
file holds each band and what dtype and shape each band has. The encoder walks these
descriptions generically; the readers use the same band names, shapes and classes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Band:
    """One band key of the safetensors dict.

    Attributes:
        name: the band key written into the safetensors dict (e.g. ``"B02"``).
        file: the file that holds the band, relative to the patch, as a template over
            ``{name}`` (the patch directory or file stem); ``None`` for a patch that is a
            single file.
        index: the 1-based band index inside that file (``rasterio``'s ``read(index)``).
        shape: the expected ``(height, width)``; ``None`` where the dataset does not fix it.
        resolution: ground sampling distance in metres, where known; bands of one resolution
            must agree in shape within a patch (checked where ``shape`` is ``None``).
        raw: the file's bytes kept verbatim as a 1-D uint8 band (e.g. SatlasPretrain's
            ``vector.json``) instead of decoded pixels.
    """

    name: str
    file: str | None = None
    index: int = 1
    shape: tuple[int, int] | None = None
    resolution: int | None = None
    raw: bool = False


@dataclass(frozen=True)
class Source:
    """How one kind of patch is found, keyed and read.

    Attributes:
        name: short name (``"s2"``), used in the manifest.
        option: the command-line option that names its input directory (``"--s2-dir"``).
        aliases: other spellings of that option (rico-hdl's).
        pattern: regular expression the patch's directory or file name must match in full.
        is_dir: whether a patch is a directory (holding band files) or a single file.
        bands: the band keys, in the order they are read.
        dtype: the numpy dtype name every band must have; ``None`` where the dataset does not
            fix it (the file's own dtype is stored).
        label_from_parent: the parent directory's name is the patch's class label.
        rgb_bands: the bands of an RGB composite (for plots), if the source has them.
        same_shape: all bands of a patch must share one shape (checked when ``shape`` is
            ``None``).
        noun: what messages call its patches (``"BigEarthNet-S1 patches"``); default
            ``"<name> patches"``.
        depth: a patch lies exactly this many levels below the root (1: directly in it);
            ``None``: at any depth (a matching directory is not searched further).
        key: the LMDB key as a template over the patch's path relative to the root:
            ``{name}`` (its directory or file name), ``{stem}`` (file name without extension),
            ``{parent}`` (the folder holding it) and ``{root}`` (the root folder's own name);
            default ``{name}`` for a directory patch, ``{stem}`` for a file patch.
        key_pattern: regular expression every key of the source matches in full (recognises
            the source's keys in an LMDB); default: derived from ``pattern``.
        subdir: the folder below the option's directory that holds this source (several
            sources of one dataset may share one option, e.g. SatlasPretrain's root).
        group: the selector option that picks this source among others sharing the option
            (``"modalities"`` -> ``--modalities sentinel2 ...``); empty: always encoded.
        layout: a regular expression over file paths relative to the source root (``/``
            separated) whose named groups identify a patch: files with equal groups (besides
            ``band`` and ``file``) are one patch, whose bands may lie in several folders. Its
            key is ``key_template`` formatted with the groups, ``pattern`` is then the regular
            expression of those keys, and band ``file`` templates are relative to
            ``patch_dir`` (formatted likewise). Empty: a patch is one directory or file.
        key_template: the key of a ``layout`` patch (``"sentinel2/{image}/{tile}"``).
        patch_dir: a ``layout`` patch's folder relative to the root (``"{image}"``).
        open_bands: the bands are the files found, not a fixed list: a file's band is its stem
            (``land_cover.png`` -> ``land_cover``); ``raw_files`` are kept verbatim under their
            full name.
        raw_files: file names of an ``open_bands`` patch stored as raw bytes (``vector.json``).
        dtypes: further dtypes a band may have besides ``dtype``.
    """

    name: str
    option: str
    pattern: str
    is_dir: bool
    bands: tuple[Band, ...]
    dtype: str | None
    aliases: tuple[str, ...] = ()
    label_from_parent: bool = False
    rgb_bands: tuple[str, ...] = ()
    same_shape: bool = False
    help: str = ""
    noun: str = ""
    depth: int | None = None
    key: str = ""
    key_pattern: str = ""
    subdir: str = ""
    group: str = ""
    layout: str = ""
    key_template: str = ""
    patch_dir: str = ""
    open_bands: bool = False
    raw_files: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # a file patch's key is its stem: the pattern without its escaped extension (``\.tif``)
        key_pattern = self.key_pattern or (
            self.pattern if self.is_dir or self.layout else re.sub(r"\\\.\w+$", "", self.pattern))
        if not self.key:
            object.__setattr__(self, "key", "{name}" if self.is_dir else "{stem}")
        object.__setattr__(self, "_layout_regex", re.compile(self.layout) if self.layout else None)
        object.__setattr__(self, "_key_regex", re.compile(key_pattern))
        object.__setattr__(self, "_regex", re.compile(self.pattern))
        if not self.noun:
            object.__setattr__(self, "noun", f"{self.name} patches")

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None  # type: ignore[attr-defined]

    def matches_key(self, key: str, like: str | None = None) -> bool:
        """Whether ``key`` has the form of this source's LMDB keys (what :meth:`key_of` gives);
        with ``like`` (a key of this source), also whether both name the same root folder where
        ``key_pattern`` captures it as ``(?P<root>...)`` (SSL4EO's L1C and L2A keys differ only there)."""
        m = self._key_regex.fullmatch(key)  # type: ignore[attr-defined]
        if m is None or like is None or "root" not in m.re.groupindex:
            return m is not None
        other = m.re.fullmatch(like)
        return other is not None and other.group("root") == m.group("root")

    def key_of(self, patch: Path, root: Path | None = None) -> str:
        """LMDB key of a patch by the source's key template (rico-hdl's rule); ``root``, the
        resolved directory it was found under (rico-hdl resolves its inputs), is needed where
        the template names ``{root}``."""
        fields = {"name": patch.name, "stem": patch.stem, "parent": patch.parent.name}
        if "{root}" in self.key:
            if root is None:
                raise ValueError(f"the key of {self.noun} names the root folder; give root=")
            fields["root"] = Path(root).name
        return self.key.format(**fields)

    def match_layout(self, relative: str) -> dict[str, str] | None:
        """The named groups of a ``layout`` match of a root-relative path, else None."""
        m = self._layout_regex.fullmatch(relative)  # type: ignore[attr-defined]
        return None if m is None else m.groupdict()

    def band_files(self, patch: Path, fields: Mapping[str, str] | None = None,
                   found: Sequence[Path] = ()) -> dict[Path, list[Band]]:
        """The files to open for a patch and the bands to read from each, in band order.

        ``fields``: a ``layout`` patch's named groups (formatted into the band file templates);
        ``found``: an ``open_bands`` patch's files, whose bands they are.
        """
        files: dict[Path, list[Band]] = {}
        if self.open_bands:
            for path in sorted(found):
                raw = path.name in self.raw_files
                files[path] = [Band(path.name if raw else path.stem, file=path.name, raw=raw)]
            return files
        stem = patch.name if self.is_dir else patch.stem
        for band in self.bands:
            path = patch if band.file is None else patch / band.file.format(name=stem, **(fields or {}))
            files.setdefault(path, []).append(band)
        return files

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def holds(self, key: str, bands: set[str]) -> bool:
        """Whether a stored patch with these band keys is one of this source's: its key has the
        source's form and its bands are the source's (any, for ``open_bands``)."""
        return self.matches_key(key) and (self.open_bands or set(self.band_names) == bands)


@dataclass(frozen=True)
class Dataset:
    """A dataset: its sources (written in this order) and what the data half needs.

    Attributes:
        name: the encode subcommand (``"bigearthnet"``).
        title: human-readable name.
        sources: the sources, in the fixed order they are written.
        aliases: other spellings of the subcommand (rico-hdl's).
        classes: class names where the layout gives labels.
        example: an example command line for ``--help``.
        datamodule: class path of the DataModule that trains on the encoded dataset.
        config: the training config for it (relative to the repository).
        fit_options: what else the config needs beyond ``lmdb_path`` (command-line overrides).
        side_files: glob patterns, relative to the directory of the sources' shared option, of
            files copied into the target beside ``data.mdb`` (same relative path), e.g.
            SatlasPretrain's ``metadata/*.json``.
        manifest_extra: a function ``(discovered patches, source roots) -> dict`` whose entries
            are added to ``manifest.json`` (dataset-level only, e.g. each image's time and tile
            count), through the manifest's one extension mechanism
            (:class:`rico_torch.manifest.Entries`).
        find: ``(source, root, keep) -> patches`` replacing the generic folder walk
            (``rico_torch.encode.discover.find_patches``), e.g. to note each patch's file prefix.
        prepare: ``(discovered, options) -> (discovered, extension)``, run on the patches found
            before writing: may drop or replace patches and returns the
            :class:`rico_torch.manifest.Extension` adding the dataset's facts (BigEarthNet v1's
            labels from each patch's JSON); ``options``: the encode command's arguments.
        options: extra command-line options of the encode subcommand, as
            ``(flag, argparse keyword arguments)``.
    """

    name: str
    title: str
    sources: tuple[Source, ...]
    aliases: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    description: str = ""
    example: str = ""
    datamodule: str = ""
    config: str = ""
    fit_options: str = ""
    side_files: tuple[str, ...] = ()
    manifest_extra: object = None
    find: object = None
    prepare: object = None
    options: tuple = ()

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no source {name!r}; valid: {[s.name for s in self.sources]}")

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b for s in self.sources for b in s.band_names)

    def fit_command(self, lmdb_path: object) -> str:
        """The command that trains the baseline model on an encoded copy at ``lmdb_path``."""
        options = f" {self.fit_options}" if self.fit_options else ""
        return f"python -m rico_torch fit --config {self.config} --data.init_args.lmdb_path {lmdb_path}{options}"

    def largest_shape(self, bands) -> tuple[int, int] | None:
        """The largest (by area) shape among ``bands`` where the dataset fixes each one's shape;
        None where it does not (UC Merced) or a band is not the dataset's."""
        fixed = {b.name: b.shape for s in self.sources for b in s.bands}
        shapes = [fixed.get(b) for b in bands]
        if not shapes or None in shapes:
            return None
        return max(shapes, key=lambda s: (s[0] * s[1], s))
