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
    (contract,) = doc["tool"]["importlinter"]["contracts"]
    assert contract["type"] == "layers" and contract["containers"] == ["csra_triton"]
    named = {m.strip() for layer in contract["layers"] for m in layer.replace(":", "|").split("|")}
    modules = {p.stem for p in (ROOT / "csra_triton").glob("*.py") if p.stem != "__init__"}
    assert named == modules, (sorted(modules - named), sorted(named - modules))
