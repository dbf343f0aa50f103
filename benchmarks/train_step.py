"""Training-step throughput: the baseline BigEarthNet model fed by the DataModule, against the
same model fed from batches already on the device.

Both runs train ``rico_torch.models.CNNClassifier`` as ``configs/bigearthnet.yaml`` sets it up
(19 classes, multi-label, width 32, 12 bands, batch 256, bf16-mixed on a GPU) with the same
Lightning ``Trainer`` settings, timing ``--steps`` steps after ``--warmup`` steps:

1. **DataModule**: ``BigEarthNetDataModule`` (``native="auto"``: native on a GPU, assembled and
   normalised there; ``--workers`` persistent workers, pinned memory on a GPU, flips);
2. **in memory**: the same number of distinct batches taken from that DataModule beforehand,
   assembled and normalised, kept on the device and replayed; no loading at all.

If the DataModule run reaches (nearly) the in-memory rate, the loader keeps the accelerator busy.

    python benchmarks/train_step.py            # 4,000 pairs; meant for a GPU machine
    python benchmarks/train_step.py --quick    # 200 pairs, batch 32, a few steps: runs anywhere
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_ROOT, bigearthnet_set, encoded_bigearthnet, load, log, machine, table  # noqa: E402

from rico_torch.data import BigEarthNetDataModule  # noqa: E402
from rico_torch.models import CNNClassifier  # noqa: E402
from rico_torch.synthetic import make_bigearthnet_metadata  # noqa: E402

BUSY = 0.9  # the DataModule keeps the device busy when it reaches this share of the in-memory rate


class StepTimer(L.Callback):
    """Wall time of the steps after ``warmup`` (device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.samples = warmup, None, None, 0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.samples += len(batch["image"])
            self._sync(module)
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.samples / (self.end - self.start)


def trainer(steps: int, timer: StepTimer) -> L.Trainer:
    cuda = torch.cuda.is_available()
    return L.Trainer(
        accelerator="auto", devices=1, precision="bf16-mixed" if cuda else "32-true", max_steps=steps,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )


def training_metadata(pairs: list[tuple[str, str]], directory: Path) -> Path:
    """The official metadata schema with nearly every patch in the train split: long epochs, as
    with the real dataset's 237,871 training patches (each epoch boundary drains the loader)."""
    file = directory / "metadata.parquet"
    if not file.exists():
        directory.mkdir(parents=True, exist_ok=True)
        make_bigearthnet_metadata(file, pairs)
        table_ = pq.read_table(file)
        splits = ["validation" if i % 50 == 0 else "test" if i % 50 == 1 else "train" for i in range(len(table_))]
        pq.write_table(table_.set_column(table_.schema.get_field_index("split"), "split", pa.array(splits)), file)
    return directory


def model() -> CNNClassifier:
    torch.manual_seed(0)
    return CNNClassifier(num_classes=19, multilabel=True, width=32, lr=1e-3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 pairs, batch 32, 2 workers, 3 + 5 steps")
    p.add_argument("--pairs", type=int, help="synthetic S1+S2 pairs (default 4,000; --quick 200)")
    p.add_argument("--batch-size", type=int, help="default 256 (--quick 32)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 4, as in the config; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 20; --quick 3)")
    p.add_argument("--steps", type=int, help="timed steps (default 100; --quick 5)")
    args = p.parse_args(argv)
    pairs = args.pairs or (200 if args.quick else 4000)
    workers = args.workers if args.workers is not None else (2 if args.quick else 4)
    batch_size = args.batch_size or (32 if args.quick else 256)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    steps = args.steps or (5 if args.quick else 100)
    load_start = load()

    ben = bigearthnet_set(pairs)
    lmdb_path = encoded_bigearthnet(ben)
    metadata_dir = training_metadata(ben.pairs, BENCH_ROOT / f"ben-{pairs}-train-metadata")

    def datamodule() -> BigEarthNetDataModule:
        return BigEarthNetDataModule(str(lmdb_path), str(metadata_dir), bands=12, batch_size=batch_size,
                                     num_workers=workers, pin_memory=torch.cuda.is_available(), flips=True)

    log(f"DataModule run: {warmup} + {steps} steps of {batch_size} ...")
    fed = StepTimer(warmup)
    trainer(warmup + steps, fed).fit(model(), datamodule=datamodule())

    log("collecting batches for the in-memory run ...")
    dm = datamodule()
    holder = trainer(1, StepTimer(0))  # attaches dm to a trainer on this device (native='auto')
    dm.trainer = holder
    dm.setup("fit")
    device = holder.strategy.root_device
    batches = []
    for batch in dm.train_dataloader():
        batches.append(dm.on_after_batch_transfer(move_data_to_device(batch, device), 0))
        if len(batches) == warmup + steps:
            break
    replay = [batches[i % len(batches)] for i in range(warmup + steps)]

    log(f"in-memory run: {warmup} + {steps} steps over {len(batches)} distinct batches on {device} ...")
    resident = StepTimer(warmup)
    trainer(warmup + steps, resident).fit(model(), train_dataloaders=DataLoader(replay, batch_size=None))

    share = fed.rate / resident.rate
    print(f"\nTraining steps, CNNClassifier (BigEarthNet config), batch {batch_size}, {steps} timed steps after "
          f"{warmup}; {machine()}, device {torch.cuda.get_device_name() if device.type == 'cuda' else device}; "
          f"{workers} workers; load average {load_start} at start, {load()} at end\n")
    print(table(["fed from", "samples/s", "ms per step", "vs in memory"], [
        ["batches already on the device", f"{resident.rate:,.0f}", f"{batch_size / resident.rate * 1e3:.1f}", "1.00"],
        [f"BigEarthNetDataModule (native={dm.loads_native})", f"{fed.rate:,.0f}",
         f"{batch_size / fed.rate * 1e3:.1f}", f"{share:.2f}"],
    ]))
    verdict = "keeps" if share >= BUSY else "does not keep"
    print(f"\nThe DataModule {verdict} the {device.type.upper()} busy "
          f"({share:.0%} of the in-memory rate; busy means >= {BUSY:.0%}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
