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


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_every_link_between_the_docs_resolves():
    assert len(README.read_text().splitlines()) <= 250  # what a newcomer needs; the rest is linked
    root = README.parent
    pages = [README, root / "benchmarks" / "README.md", *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
                assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"


def test_every_headline_number_is_in_the_benchmarks_readme_beside_its_script():
    """The README's performance table is a digest: each of its figures is in benchmarks/README.md, and
    each row names a script in benchmarks/ that measures it."""
    text = README.read_text()
    table = text.split("## Performance", 1)[1].split("\n\n")[2]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    assert len(rows) >= 6
    benchmarks = (README.parent / "benchmarks" / "README.md").read_text()
    for row in rows:
        *cells, script = [c.strip() for c in row.strip("|").split("|")]
        name = re.match(r"`(\w+\.py)", script)
        assert name and (README.parent / "benchmarks" / name.group(1)).exists(), row
        for number in re.findall(r"\d[\d,.]*\d|\d", " ".join(cells)):
            assert number in benchmarks, f"{number} (README row {cells[0]!r}) is not in benchmarks/README.md"
