"""Facts the encode half's modules share with its command line (no CLI imports: ``info`` and
``rico_torch.scenes.chipper`` use them, and ``cli`` imports those)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_TMP_PREFIX = "rico_torch-demo-"  # the demo's sources live in such a temporary folder
DEMO_CONFIG = "configs/demo.yaml"


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` as (I, N)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= I < N")
    return index, count


def demo_fit_command(target: Path) -> str:
    """The command that trains on the demo's LMDB at ``target`` (configs/demo.yaml reads demo-lmdb)."""
    command = f"python -m rico_torch fit --config {DEMO_CONFIG}"
    if Path(target) != Path("demo-lmdb"):
        command += f" --data.init_args.lmdb_path {target} --data.init_args.metadata_dir {target}"
    return command
