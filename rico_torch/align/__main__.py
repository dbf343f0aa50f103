"""``python -m rico_torch.align to-source``: a prediction stitched on an aligned encode's target grid,
warped back onto each source file's own grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_errors import report
from ..errors import FormatError, UserError
from .sources import RESAMPLINGS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rico_torch.align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-source", help="warp a stitched prediction onto every source file's grid")
    p.add_argument("prediction", type=Path, help="GeoTIFF stitched on the target grid (rico_torch.scenes.stitch)")
    p.add_argument("--target-dir", required=True, type=Path, help="the LMDB encoded with encode scenes --grid ...")
    p.add_argument("--output-dir", required=True, type=Path, help="folder for <source file stem>.tif per source")
    p.add_argument("--resampling", choices=RESAMPLINGS, default="nearest", help="default nearest (class maps)")
    args = parser.parse_args(argv)
    from ..scenes.stitcher import scene_manifest
    from .scene import to_sources

    try:
        scenes = scene_manifest(args.target_dir)["scenes"]
        aligned = [s["align"] for s in scenes.values() if s.get("align")]
        if not aligned:
            raise FormatError(f"{args.target_dir}: not an aligned encode (encode scenes without --grid/--grid-like)")
        for path in to_sources(args.prediction, aligned[0], args.output_dir, args.resampling):
            print(path)
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
