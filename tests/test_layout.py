"""The Ray boundary is physical: the numerical core, the algorithms and the task families
import no Ray, directly or through anything they import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PURE = ["metaray/core", "metaray/algorithms", "metaray/tasks"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pure_modules_name_no_ray_import():
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.split(".")[0] == "ray")
                 for folder in PURE for path in sorted((ROOT / folder).rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_core_loads_no_ray():
    """Transitively too: every pure module imported in a fresh interpreter, then sys.modules checked."""
    modules = [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for folder in PURE for path in sorted((ROOT / folder).rglob("*.py"))]
    assert "metaray.core.task_worker" in modules and "metaray.algorithms.maml" in modules
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
