"""What the tests and the benchmarks may import: no test module imports another (shared helpers
live in conftest.py and tests/support.py), and nothing imports the Hydra script `train.py` (its
import registers the configs and wraps `main` in Hydra; the loop is lab.loop.train)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO
from support import imported_modules


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    # IPython magics and shell lines are not Python
    return "\n".join(line for c in cells if c["cell_type"] == "code"
                     for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))


def sources(*folders: str):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, path.read_text()
        for path in sorted((REPO / folder).rglob("*.ipynb")):
            yield path, notebook_code(path)


def offenders(folders, bad) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line}: imports {module}"
            for path, source in sources(*folders) for line, module in imported_modules(source) if bad(module)]


def test_no_test_module_imports_another():
    def is_test_module(module: str) -> bool:
        return any(part.startswith("test_") for part in module.split("."))

    assert offenders(["tests"], is_test_module) == [], \
        "move what tests share into tests/conftest.py (fixtures) or tests/support.py"


def test_nothing_imports_the_hydra_script():
    assert offenders(["tests", "experiments", "notebooks", "lab", "scripts"], lambda m: m == "train") == [], \
        "import the loop from lab.loop (train.py is only the Hydra entry point)"


def test_the_checks_see_imports_in_functions_and_relative_ones():
    source = "import os\ndef f():\n    from test_faults import QUIET\nfrom . import test_x\nimport train\n"
    assert sorted(m for _, m in imported_modules(source)) == ["os", "test_faults", "test_x", "train"]
