"""The README's quick start and loading example work as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .conftest import encode_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_demo_then_loading_example(tmp_path, monkeypatch):
    text = README.read_text()
    demo = re.search(r"python -m rico_torch\.encode demo --target-dir (\S+)", text)
    assert demo, "the quick start runs the demo"
    monkeypatch.chdir(tmp_path)
    encode_cli("demo", "--target-dir", demo.group(1), "--patches", "3")
    example = re.search(r"## Loading in five lines\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["sample"]["image"].shape == (3, 120, 120)
    assert namespace["sample"]["key"].startswith("S2")
    batches = re.search(r"Batches, read by worker processes into reused shared memory:\n\n```python\n(.*?)```", text,
                        re.S).group(1)
    exec(compile(batches, "README.md", "exec"), namespace)
    assert namespace["last"].shape == (1, 3, 120, 120)  # 3 patches in batches of 2: the last has one
    ds = namespace["ds"]
    index = {ds.key(i): i for i in range(len(ds))}
    for kept in namespace["batches"]:  # each keeps its own pixels
        assert torch.equal(kept["image"], ds.read_batch([index[k] for k in kept["key"]])["image"])
    namespace["loader"].close()


def test_readme_test_command_is_what_ci_runs():
    command = ('pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps configilm==0.7.1 && '
               'pip install --no-deps --target .bigearthnet-encoder -r tests/bigearthnet-encoder.txt && python -m pytest -q')
    assert command in README.read_text()
    assert command in (README.parent / ".ci" / "run").read_text()
