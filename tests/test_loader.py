"""PatchLoader: batches equal to ``read_batch`` in sampler order, epochs, rank splits, and that no
process or shared memory outlives it, whatever way it ends (worker exception, SIGKILL, Ctrl-C,
``del``, garbage collection, interpreter exit, the main process killed)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import DistributedSampler

from rico_torch.catalog import bigearthnet
from rico_torch.data import LMDBPatchDataset, PatchLoader, WorkerLostError
from rico_torch.errors import ConfigError, UnknownKeyError

ROOT = Path(__file__).resolve().parents[1]
BANDS = ["B02", "B03", "B04", "B01"]  # 64 px and 20 px: replication in float mode, two native groups


@pytest.fixture(scope="module")
def eurosat_lmdb(tmp_path_factory):
    """30 EuroSAT patches (3 classes x 10): 13 bands of 64 px, B01 B09 B10 at 20 px."""
    from .conftest import encoded_eurosat

    return encoded_eurosat(tmp_path_factory, per_class=10)


def shm_entries() -> set[str]:
    """Shared-memory segments in /dev/shm; not semaphores (``sem.*``): the loader makes none, and other
    processes on a shared machine (multiprocessing locks) come and go meanwhile."""
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


def batch_maps(pid: int | str = "self") -> int:
    """How many of the loader's shared-memory batch rings a process maps."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("rico_torch-batches" in line for line in f)


def children() -> set[int]:
    """Child processes, less multiprocessing's resource tracker (one per interpreter, started by the
    first spawned process, ending with the interpreter)."""
    from multiprocessing import resource_tracker

    return {p.pid for p in psutil.Process().children(recursive=True)} - {resource_tracker._resource_tracker._pid}


def gone(pids, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def clean():
    """Asserts that a test leaves no child process, /dev/shm entry or batch ring behind."""
    before_children, before_shm = children(), shm_entries()
    yield
    gc.collect()
    assert gone(children() - before_children), children() - before_children
    assert shm_entries() - before_shm == set()
    assert batch_maps() == 0


def expected(ds: LMDBPatchDataset, indices: list[int]) -> dict:
    return ds.read_batch(indices)


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        if name == "native":
            assert list(got[name]) == list(value)
            for group, tensor in value.items():
                assert torch.equal(got[name][group], tensor), group
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_batches_equal_read_batch_in_order(eurosat_lmdb, clean, num_workers, native):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS, native=native)
    with PatchLoader(ds, batch_size=7, num_workers=num_workers) as loader:
        assert len(loader) == 5  # 30 items: 4 x 7 + 2
        for epoch in range(2):
            batches = list(b["key"] for b in loader)  # keys only: the tensors are valid until the next batch
            assert [k for keys in batches for k in keys] == [ds.key(i) for i in range(len(ds))]
            for i, batch in enumerate(loader):
                assert_same(batch, expected(ds, list(range(7 * i, min(7 * i + 7, len(ds))))))
        if num_workers:
            assert len(loader.worker_pids) == num_workers
    assert loader.worker_pids == []


def test_pairs_and_mask(bigearthnet_lmdb, bigearthnet_files, clean):
    s2 = sorted(bigearthnet_files.s2_keys)
    pairs = dict(bigearthnet_files.pairs)
    items = [(k, pairs[k], f"{k}_reference_map") for k in s2]
    ds = LMDBPatchDataset(bigearthnet_lmdb, bands=["VV", "B02", "B01"], keys=items,
                          mask_band=bigearthnet.REFERENCE_MAP_BAND, labels=torch.arange(len(items)))
    with PatchLoader(ds, batch_size=4, num_workers=2) as loader:
        for i, batch in enumerate(loader):
            assert_same(batch, expected(ds, list(range(4 * i, min(4 * i + 4, len(ds))))))
        assert i == 1


def test_drop_last_and_len(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    with PatchLoader(ds, batch_size=7, num_workers=2, drop_last=True) as loader:
        assert len(loader) == 4
        assert [len(b["key"]) for b in loader] == [7] * 4


def test_slots_are_reused(eurosat_lmdb, clean):
    """No new memory per batch: every batch views one of workers x slots buffers, and a batch is
    valid until the next is asked for."""
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    with PatchLoader(ds, batch_size=2, num_workers=2, slots=2) as loader:
        pointers, kept = set(), []
        for i, batch in enumerate(loader):
            pointers.add(batch["image"].data_ptr())
            kept.append(batch["image"].clone())
            assert torch.equal(batch["image"], expected(ds, [2 * i, 2 * i + 1])["image"])
        assert len(pointers) == 4 and i == 14
        assert all(torch.equal(k, expected(ds, [2 * i, 2 * i + 1])["image"]) for i, k in enumerate(kept))


def test_shuffle_is_seeded_per_epoch_and_independent_of_workers(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)

    def epochs(loader, n=2):
        return [[k for b in loader for k in b["key"]] for _ in range(n)]

    with PatchLoader(ds, batch_size=4, shuffle=True, seed=5, num_workers=2) as a, \
            PatchLoader(ds, batch_size=4, shuffle=True, seed=5, num_workers=0) as b:
        first, second = epochs(a)
        assert sorted(first) == sorted(second) == sorted(ds.key(i) for i in range(len(ds)))
        assert first != second  # each epoch its own order
        assert epochs(b) == [first, second]  # the same orders whatever the worker count
        a.set_epoch(1)
        assert epochs(a, 1) == [second]
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(5)).tolist()
        b.set_epoch(0)
        assert epochs(b, 1) == [[ds.key(i) for i in order]]  # epoch e: seed + e, as DistributedSampler
    torch.manual_seed(3)
    unseeded = epochs(PatchLoader(ds, batch_size=4, shuffle=True, num_workers=0), 1)
    torch.manual_seed(3)
    assert epochs(PatchLoader(ds, batch_size=4, shuffle=True, num_workers=0), 1) == unseeded  # torch.manual_seed


def test_distributed_sampler_gives_each_rank_its_share(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    keys = []
    for rank in range(2):
        sampler = DistributedSampler(range(len(ds)), num_replicas=2, rank=rank, shuffle=True, seed=1)
        with PatchLoader(ds, batch_size=4, sampler=sampler, num_workers=2) as loader:
            loader.set_epoch(3)
            rank_keys = [k for b in loader for k in b["key"]]
            sampler.set_epoch(3)
            assert rank_keys == [ds.key(i) for i in sampler]
            keys += rank_keys
    assert sorted(keys) == sorted(ds.key(i) for i in range(len(ds)))  # 30 / 2: every sample once


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_batches_kept_past_the_next_one_keep_their_pixels(eurosat_lmdb, clean, num_workers, native):
    """``list(loader)``, ``torch.cat`` over batches, views kept from each batch, a batch held across
    two iterations: every batch keeps its own pixels (its slot gets new memory, no error), while
    a plain loop reuses the slots (no batch counted as kept)."""
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS, native=native)
    image = "native" if native else "image"

    def pixels(batch):
        return batch[image][next(iter(batch[image]))] if native else batch[image]

    want = [expected(ds, list(range(4 * i, min(4 * i + 4, len(ds))))) for i in range(8)]
    with PatchLoader(ds, batch_size=4, num_workers=num_workers) as loader:
        for _ in range(2):  # the usual loop, epoch after epoch (the loop variable outlives the loop): nothing kept
            for i, batch in enumerate(loader):
                assert_same(batch, want[i])
        if num_workers:
            assert loader._workers.kept == 0
        for _ in range(2):
            batches = list(loader)
            for got, w in zip(batches, want, strict=True):
                assert_same(got, w)
        assert torch.equal(torch.cat([pixels(b) for b in loader]), torch.cat([pixels(w) for w in want]))
        firsts = [pixels(b)[0] for b in loader]  # a view of one row of each batch
        assert all(torch.equal(f, pixels(w)[0]) for f, w in zip(firsts, want, strict=True))
        held = next(iter(loader))  # an abandoned iteration's batch, then a whole new epoch
        for batch in loader:
            pass
        assert_same(held, want[0])


def test_break_then_next_epoch_is_complete(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    with PatchLoader(ds, batch_size=3, num_workers=2) as loader:
        for batch in loader:
            break
        iterator = iter(loader)
        next(iterator)
        for i, batch in enumerate(loader):  # a new iteration replaces the unfinished ones
            assert_same(batch, expected(ds, [3 * i, 3 * i + 1, 3 * i + 2]))
        assert i == 9
        with pytest.raises(RuntimeError, match="replaced by a newer one"):
            next(iterator)


def test_worker_exception_is_raised_with_traceback_and_key(eurosat_lmdb, clean):
    good = [LMDBPatchDataset(eurosat_lmdb, bands=BANDS).key(i) for i in range(8)]
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS, keys=good[:5] + ["no_such_key"] + good[5:])
    with PatchLoader(ds, batch_size=3, num_workers=2) as loader:
        with pytest.raises(UnknownKeyError) as error:
            list(loader)
        message = str(error.value)
        assert "PatchLoader worker 1" in message and "key 'no_such_key' (item 5)" in message
        assert "Traceback (most recent call last)" in message and ", in _read\n" in message  # the worker's
        pids = loader.worker_pids
        assert len(pids) == 2  # the workers carry on
        keys = [k for b in PatchLoader(ds, batch_size=3, num_workers=0, sampler=[0, 1, 2, 6, 7, 8])
                for k in b["key"]]
        assert [k for b in PatchLoader(ds, batch_size=3, num_workers=2, sampler=[0, 1, 2, 6, 7, 8])
                for k in b["key"]] == keys
        loader.sampler = [0, 1, 2, 6, 7, 8]
        assert [k for b in loader for k in b["key"]] == keys and loader.worker_pids == pids


def test_killed_worker_raises_within_seconds_and_leaves_nothing(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    loader = PatchLoader(ds, batch_size=1, num_workers=2)
    iterator = iter(loader)
    next(iterator)
    pids = loader.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerLostError, match=rf"worker 1 \(pid {pids[1]}\) was killed by signal SIGKILL"):
        for _ in iterator:
            pass
    assert time.monotonic() - start < 5
    assert gone(pids) and loader.worker_pids == []
    assert len([b["key"] for b in loader]) == len(ds)  # a new iteration starts new workers
    del loader, iterator
    gc.collect()


def test_del_gc_and_close_stop_workers_and_free_the_rings(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    loader = PatchLoader(ds, batch_size=4, num_workers=2)
    iterator = iter(loader)
    next(iterator)
    batch = next(iterator)  # each worker's first answer brings its ring
    pids = loader.worker_pids
    assert batch_maps() == 2 and all(batch_maps(p) == 1 for p in pids)
    del loader, iterator
    gc.collect()
    assert gone(pids)
    assert batch_maps() == 1  # the batch still views its ring: it stays valid
    del batch
    assert batch_maps() == 0

    cycle = PatchLoader(ds, batch_size=4, num_workers=1)
    cycle.self_reference = cycle  # only the cycle collector can free it
    next(iter(cycle))
    pids = cycle.worker_pids
    del cycle
    gc.collect()
    assert gone(pids)

    loader = PatchLoader(ds, batch_size=4, num_workers=2)
    keys = [b["key"] for b in loader]
    pids = loader.worker_pids
    loader.close()
    assert gone(pids) and loader.worker_pids == []
    assert [b["key"] for b in loader] == keys  # iterating again starts new workers
    loader.close()


def test_ctrl_c_in_a_loop_then_iterating_again_reads_correctly(eurosat_lmdb, clean, default_sigint):
    """A notebook's interrupted loop: the next iteration reads every batch right (a message cut in
    half by Ctrl-C stops the workers; new ones start)."""
    import threading

    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    loader = PatchLoader(ds, batch_size=1, num_workers=2, sampler=list(range(len(ds))) * 1000)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    loader.sampler = list(range(len(ds)))
    for i, batch in enumerate(loader):
        assert_same(batch, expected(ds, [i]))
    loader.close()


_INTERRUPT_AT_FORK: list[bool] = []  # armed: the next fork gets a Ctrl-C


def _interrupt_at_fork() -> None:
    if _INTERRUPT_AT_FORK:
        _INTERRUPT_AT_FORK.clear()
        os.kill(os.getpid(), signal.SIGINT)


os.register_at_fork(before=_interrupt_at_fork)


def test_ctrl_c_while_the_workers_fork_is_raised(eurosat_lmdb, clean, default_sigint):
    """CPython's at-fork hooks swallow a KeyboardInterrupt raised in them: a Ctrl-C landing while a
    worker forks is held back until the workers are started, then raised (not a whole epoch later)."""
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    loader = PatchLoader(ds, batch_size=1, num_workers=2)
    _INTERRUPT_AT_FORK.append(True)
    read = []
    with pytest.raises(KeyboardInterrupt):
        for batch in loader:
            read.append(batch["key"])
    assert read == [] and loader.worker_pids == []
    assert [k for b in loader for k in b["key"]] == [ds.key(i) for i in range(len(ds))]  # starts again
    loader.close()


SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (a background job)
from rico_torch.data import LMDBPatchDataset, PatchLoader
ds = LMDBPatchDataset(sys.argv[1], bands=["B02", "B03"])
loader = PatchLoader(ds, batch_size=1, num_workers=2, sampler=list(range(len(ds))) * 1000)
iterator = iter(loader)
next(iterator)
print(" ".join(map(str, loader.worker_pids)), flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # interpreter exit, loader still iterating
for batch in iterator:  # Ctrl-C or kill -9 arrive here
    time.sleep(0.001)
"""


@pytest.mark.parametrize("how", ["exit", "SIGINT", "SIGKILL"])
def test_interpreter_exit_ctrl_c_and_a_killed_main_process_leave_nothing(eurosat_lmdb, clean, how):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(eurosat_lmdb), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        if how != "exit":
            os.kill(proc.pid, getattr(signal, how))
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == {"exit": 0, "SIGINT": -2, "SIGKILL": -9}[how]  # -2: Python re-raises SIGINT, stderr
    if how == "SIGINT":
        assert stderr.rstrip().endswith("KeyboardInterrupt") and stderr.count("Traceback") == 1  # workers: quiet
    assert gone(pids)


def test_spawn_context(eurosat_lmdb, clean):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS, native=True)
    with PatchLoader(ds, batch_size=16, num_workers=1, multiprocessing_context="spawn") as loader:
        for i, batch in enumerate(loader):
            assert_same(batch, expected(ds, list(range(16 * i, min(16 * i + 16, len(ds))))))


def test_pin_memory_without_cuda_says_so_once(eurosat_lmdb, clean, recwarn):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: pin_memory pins")
    from rico_torch.data import loader as loader_module

    loader_module._Pinning._warned = False
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    for _ in range(2):
        with PatchLoader(ds, batch_size=8, num_workers=1, pin_memory=True) as loader:
            assert [len(b["key"]) for b in loader] == [8, 8, 8, 6]
    assert [str(w.message) for w in recwarn] == ["PatchLoader(pin_memory=True): no CUDA device, batches are not pinned"]


def test_arguments_are_checked(eurosat_lmdb):
    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    with pytest.raises(ConfigError) as caught:
        PatchLoader(ds, shuffle=True, sampler=[0])
    assert str(caught.value) == "give shuffle=True or a sampler, not both (the sampler decides the order)"
    with pytest.raises(ConfigError) as caught:
        PatchLoader(ds, batch_size=0)
    assert str(caught.value) == "batch_size=0: give an int >= 1"
    with pytest.raises(ConfigError, match="slots=0: give an int >= 1"):
        PatchLoader(ds, slots=0)
    with pytest.raises(TypeError, match="LMDBPatchDataset"):
        PatchLoader(list(range(3)))
    with pytest.raises(ConfigError, match="transforms"):
        PatchLoader(LMDBPatchDataset(eurosat_lmdb, bands=BANDS, transforms=lambda s: s))


def test_pickled_loader_starts_its_own_workers(eurosat_lmdb, clean):
    import pickle

    ds = LMDBPatchDataset(eurosat_lmdb, bands=BANDS)
    with PatchLoader(ds, batch_size=10, num_workers=1) as loader:
        keys = [b["key"] for b in loader]
        with pickle.loads(pickle.dumps(loader)) as copy:
            assert copy.worker_pids == [] and [b["key"] for b in copy] == keys


class KeysPerEpoch(__import__("lightning").LightningModule):
    """Records the keys of every training and validation batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(13, 3)
        self.seen: dict[tuple[str, int], list[str]] = {}

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        self.seen.setdefault((stage, self.current_epoch), []).extend(batch["key"])
        return torch.nn.functional.cross_entropy(self.layer(batch["image"].mean(dim=(2, 3))), batch["label"])

    def training_step(self, batch, batch_idx):
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_datamodule_fits_through_patch_loader_and_keeps_torch_on_request(eurosat_lmdb, clean, monkeypatch):
    import lightning as L
    from torch.utils.data import DataLoader

    from rico_torch.data import EuroSATDataModule

    kept, close = [], PatchLoader.close

    def counting_close(loader):  # Lightning's loop keeps no batch past the next: every slot is reused
        if loader._workers is not None:
            kept.append(loader._workers.kept)
        close(loader)

    monkeypatch.setattr(PatchLoader, "close", counting_close)
    dm = EuroSATDataModule(str(eurosat_lmdb), batch_size=4, num_workers=2, mean=[0.0] * 13, std=[1.0] * 13)
    model = KeysPerEpoch()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert kept == [0, 0]  # train and val
    for stage in ("train", "val"):
        everything = sorted(dm.datasets[stage].key(i) for i in range(len(dm.datasets[stage])))
        orders = [model.seen[(stage, epoch)] for epoch in range(2)]
        assert [sorted(o) for o in orders] == [everything] * 2  # every sample once per epoch
        assert (orders[0] != orders[1]) == (stage == "train")  # the train split is reshuffled
    assert dm._patch_loaders == {}  # teardown closed them (the clean fixture: no worker left)

    torch_dm = EuroSATDataModule(str(eurosat_lmdb), batch_size=4, num_workers=0, loader="torch", mean=[0.0] * 13,
                                 std=[1.0] * 13)
    torch_dm.setup("fit")
    assert isinstance(torch_dm.train_dataloader(), DataLoader)
    with pytest.raises(ValueError, match="loader='dali'"):
        EuroSATDataModule(str(eurosat_lmdb), loader="dali")


def test_workers_draw_different_random_crops_and_fill_every_output(tmp_path, clean):
    """Random crops (drawn in the workers) differ between workers, as with DataLoader's per-worker
    seeds, and every output a dataset fills (here ``crop``) travels through the ring."""
    from rico_torch.synthetic import make_eurosat

    files = make_eurosat(tmp_path / "src", per_class=2)
    from .conftest import encode_cli

    encode_cli("eurosat-ms", "--dataset-dir", str(files.root), "--target-dir", str(tmp_path / "lmdb"),
               "--num-workers", "0")
    key = sorted(files.labels)[0]
    ds = LMDBPatchDataset(tmp_path / "lmdb", bands=["B02"], keys=[key] * 8, crop=16)
    whole = LMDBPatchDataset(tmp_path / "lmdb", bands=["B02"], keys=[key])[0]["image"]
    with PatchLoader(ds, batch_size=4, num_workers=2) as loader:
        batches = [{k: v.clone() for k, v in b.items() if k in ("image", "crop")} for b in loader]
    corners = [tuple(c.tolist()) for b in batches for c in b["crop"]]
    assert corners[:4] != corners[4:]  # worker 0 and worker 1 drew their own windows
    for b in batches:
        for image, (top, left) in zip(b["image"], b["crop"].tolist()):
            assert torch.equal(image, whole[:, top : top + 16, left : left + 16])
