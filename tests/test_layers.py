"""The import-layer contract (pyproject.toml [tool.importlinter], checked by `lint-imports` in
.ci/run) names every module of the package, so that a new module cannot sit outside the layers."""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_triton   # the import contract, pure Python

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_every_module_is_in_a_layer():
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = {c["containers"][0]: c for c in doc["tool"]["importlinter"]["contracts"]}
    assert sorted(contracts) == ["csra_triton", "csra_triton.tools"]
    for container, contract in contracts.items():
        assert contract["type"] == "layers"
        named = {m.strip() for layer in contract["layers"]
                 for m in layer.replace(":", "|").split("|")}
        folder = ROOT.joinpath(*container.split("."))
        modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        modules |= {p.parent.name for p in folder.glob("*/__init__.py")}
        assert named == modules, (container, sorted(modules - named), sorted(named - modules))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_the_docs_layer_table_is_the_contract():
    """docs/architecture.md's layer table lists the runtime contract's layers, in its order,
    with the same modules in each (one table, and it cannot drift)."""
    import re
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in doc["tool"]["importlinter"]["contracts"]
                    if c["containers"] == ["csra_triton"])
    want = [{m.strip() for m in layer.split("|")} for layer in contract["layers"]]
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- layers:begin", 1)[1].split("<!-- layers:end", 1)[0]
    rows = [line.split("|")[2] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")]
    got = [set(re.findall(r"`([A-Za-z_]+)`", cell)) for cell in rows]
    assert got == want, (got, want)
