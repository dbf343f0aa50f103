"""Distributed training: two CPU ranks (gloo) through Lightning's DDP on an LMDB DataModule.

Launcher: ``strategy="ddp_fork"``, run by a fresh Python interpreter that the test starts.

* Plain ``"ddp"`` re-executes ``sys.argv`` for rank 1, which under pytest re-runs the whole
  pytest session in it: not usable here.
* ``"ddp_spawn"`` works, but not reliably: a spawned rank exits through full interpreter and
  C++ static teardown, where rank 1 intermittently aborts after the fit has finished
  (``terminate called without an active exception``, SIGABRT; Lightning then raises
  ``ProcessExitedException``). It is not rico_torch's doing: a minimal Lightning model on a
  ``TensorDataset`` does the same (torch 2.13, Lightning 2.6, gloo; 12 of 40 runs on a busy
  2-core machine). Forked ranks leave with ``os._exit``, so that teardown never runs.
* Forking the pytest process itself would inherit whatever earlier tests left behind
  (OpenMP thread pools, threads); a fresh interpreter that has done nothing but open the
  LMDB is a clean parent, and the ranks use one torch thread each.

Forking also makes the handle check meaningful: the parent opens the LMDB before ``fit``, so
each rank inherits an open environment and must open its own instead of reading through it.

What holds (Lightning 2.x, default ``use_distributed_sampler=True``): each loader reads through a
``torch.utils.data.DistributedSampler(shuffle=<train loader>, seed=$PL_GLOBAL_SEED,
drop_last=False)``, ``set_epoch(epoch)`` before each epoch: the DataModule builds it for its
PatchLoader (Lightning injects one only into torch DataLoaders), as Lightning would. With ``n`` items each rank reads
``ceil(n/2)``: for even ``n`` (train, 24) every item exactly once per epoch; for odd ``n``
(val, 3) the sampler pads by repeating the first index of the epoch's order, so every item is
read once except exactly one read twice (``n + 1`` reads). The test asserts exactly that, and
each rank's exact key sequence, for train and val.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from rico_torch.data import EuroSATDataModule, store

SEED = 17
EPOCHS = 2
SIZES = {"train": 24, "val": 3}  # even: each sample exactly once; odd: padding


def environment_opener(path: Path) -> int:
    """The pid that opened this process's cached LMDB handle on ``path`` (store internals:
    ``_HANDLES`` maps the real path to a handle recording its opener's pid)."""
    real = os.path.realpath(path)
    if real not in store._HANDLES:
        raise AssertionError(f"no LMDB environment open on {real}")
    return store._HANDLES[real].pid


class KeyRecorder(L.LightningModule):
    """A linear classifier on band means that writes down every key it is fed.

    One file per stage, rank and epoch; one line per sample: key, pid of the rank, the
    dataset's reading pid, the pid that opened the LMDB environment it reads through, and the
    pids of the PatchLoader's workers (none when the rank reads itself).
    """

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.layer = torch.nn.Linear(13, 3)

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)  # a forked rank stays out of OpenMP (not fork-safe with libgomp)

    def _record(self, stage: str, batch: dict) -> None:
        datamodule = self.trainer.datamodule
        dataset = datamodule.datasets[stage]
        opened_by = environment_opener(datamodule.lmdb_path)
        workers = ",".join(map(str, datamodule._patch_loaders[stage].worker_pids))
        file = self.out_dir / f"{stage}_rank{self.global_rank}_epoch{self.current_epoch}.txt"
        with open(file, "a") as f:
            for key in batch["key"]:
                f.write(f"{key}\t{os.getpid()}\t{dataset._pid}\t{opened_by}\t{workers}\n")

    def _loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.layer(batch["image"].mean(dim=(2, 3))), batch["label"])

    def training_step(self, batch, batch_idx):
        self._record("train", batch)
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)
        self.log("val_loss", self._loss(batch), sync_dist=True, batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def datamodule(lmdb_path: Path, num_workers: int = 0) -> EuroSATDataModule:
    """33 patches, stratified per class 8 / 1 / 2: 24 train (even), 3 val (odd: padding), 6 test."""
    return EuroSATDataModule(str(lmdb_path), batch_size=4, num_workers=num_workers, mean=[0.0] * 13, std=[1.0] * 13,
                             val_fraction=0.1, test_fraction=0.2, seed=0)


def fit(lmdb_path: Path, out_dir: Path, num_workers: int) -> None:
    """The training run (executed by the fresh interpreter, see FIT)."""
    dm = datamodule(lmdb_path, num_workers)
    dm.setup("fit")
    assert dm.datasets["train"][0]["image"].shape == (13, 64, 64)  # the parent holds the LMDB open
    trainer = L.Trainer(strategy="ddp_fork", devices=2, accelerator="cpu", max_epochs=EPOCHS,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir))
    trainer.fit(KeyRecorder(str(out_dir)), datamodule=dm)
    assert trainer.state.finished


FIT = """
import os, sys
from pathlib import Path
from tests.test_ddp import fit
parent = os.getpid()
fit(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
assert os.getpid() == parent  # forked ranks never come back here
print(f"parent={parent}")
"""


@pytest.fixture(scope="module")
def lmdb_30(tmp_path_factory):
    from .conftest import encoded_eurosat

    return encoded_eurosat(tmp_path_factory, per_class=11)


def expected_keys(dataset, shuffle: bool, epoch: int) -> list[list[str]]:
    """Each rank's keys, in order, from DistributedSampler with Lightning's settings."""
    out = []
    for rank in range(2):
        sampler = DistributedSampler(range(len(dataset)), num_replicas=2, rank=rank, shuffle=shuffle, seed=SEED)
        sampler.set_epoch(epoch)
        out.append([dataset.key(i) for i in sampler])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ddp_two_ranks_read_their_distributed_sampler_shares(lmdb_30, tmp_path, num_workers):
    """Through the DataModules' PatchLoader, which splits by rank itself: read in each rank's own
    process (0 workers: the handle checks below), or by 2 PatchLoader workers per rank."""
    env = {**os.environ, "PL_GLOBAL_SEED": str(SEED), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", FIT, str(lmdb_30), str(tmp_path), str(num_workers)], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parent = proc.stdout.strip().splitlines()[-1].removeprefix("parent=")

    dm = datamodule(lmdb_30)
    dm.setup("fit")
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == sorted(
        f"{stage}_rank{rank}_epoch{epoch}.txt" for stage in SIZES for rank in range(2) for epoch in range(EPOCHS))
    rank_pids = [set(), set()]
    for stage, shuffle in (("train", True), ("val", False)):
        dataset = dm.datasets[stage]
        n = len(dataset)
        assert n == SIZES[stage]
        everything = {dataset.key(i) for i in range(n)}
        orders = []
        for epoch in range(EPOCHS):
            records = [
                [line.split("\t") for line in (tmp_path / f"{stage}_rank{rank}_epoch{epoch}.txt").read_text().splitlines()]
                for rank in range(2)
            ]
            keys = [[r[0] for r in rank_records] for rank_records in records]
            # ceil(n/2) per rank: with n even every key exactly once; with n odd every key
            # once and exactly one twice (the sampler's padding)
            assert [len(k) for k in keys] == [math.ceil(n / 2)] * 2
            counts = Counter(keys[0] + keys[1])
            assert set(counts) == everything
            assert sorted(counts.values()) == ([1] * (n - 1) + [2] if n % 2 else [1] * n)
            assert keys == expected_keys(dataset, shuffle, epoch)
            orders.append(keys)
            for rank, rank_records in enumerate(records):
                # the rank read in its own process, through an environment that process opened,
                # not the one it inherited from the parent
                (pid,) = {r[1] for r in rank_records}
                if not num_workers:
                    assert {r[2] for r in rank_records} == {pid}
                    assert {r[3] for r in rank_records} == {pid}
                else:  # the rank's own PatchLoader workers read
                    (workers,) = {r[4] for r in rank_records}
                    assert len(set(workers.split(",")) - {pid}) == num_workers
                rank_pids[rank].add(pid)
        if shuffle:
            assert orders[0] != orders[1]  # set_epoch reshuffles the train split
        else:
            assert orders[0] == orders[1]
    assert [len(p) for p in rank_pids] == [1, 1]  # one process per rank for the whole fit
    assert rank_pids[0] != rank_pids[1] and parent not in rank_pids[0] | rank_pids[1]
