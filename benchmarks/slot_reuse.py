"""PatchLoader float32 samples/s with a simulated training step: does a worker read ahead while the step runs?

On the LMDB ``benchmarks/read.py`` builds and caches (/tmp/rico_torch-bench/ben-500-lmdb: run
``python benchmarks/read.py --quick`` once first), 14 bands, batch 256, best of 3 epochs after a
warm-up one. Run it with two checkouts' PYTHONPATH, interleaved, to compare them:

    python benchmarks/slot_reuse.py WORKERS SLOTS STEP_MS   # SLOTS 'd': the default; STEP_MS: a sleep per batch
"""
import sys, time
import torch
from rico_torch.data import LMDBPatchDataset, PatchLoader
from rico_torch.data.store import read_manifest
torch.set_num_threads(1)
path = "/tmp/rico_torch-bench/ben-500-lmdb"
keys = read_manifest(path).keys_by_source()
pairs = list(zip(sorted(keys["s2"]), sorted(keys["s1"])))
BANDS = ["VV", "VH", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
ds = LMDBPatchDataset(path, bands=BANDS, keys=pairs * 4)
workers, step = int(sys.argv[1]), float(sys.argv[3]) / 1000
kw = {} if sys.argv[2] == "d" else {"slots": int(sys.argv[2])}
loader = PatchLoader(ds, batch_size=256, num_workers=workers, shuffle=True, seed=0, **kw)
best = 0
for epoch in range(4):
    start = time.perf_counter(); n = 0
    for batch in loader:
        n += len(batch["key"])
        if step:
            time.sleep(step)
    if epoch:
        best = max(best, n / (time.perf_counter() - start))
print(f"{best:.0f} slots={loader.slots} kept={getattr(loader._workers, 'kept', '-')}")
loader.close()
