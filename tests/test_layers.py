"""The stages import one way: sensors -> enrichment -> verdict -> sinks.  A stage
imports only from itself, from earlier stages, or from the modules below all
stages (tracer/in_root.py, tracer/oci_paths.py, tracer/inotify.py, facts, event,
host).  Imports under `if TYPE_CHECKING:` are types only and are not counted."""

from __future__ import annotations

import ast
import pathlib

import tracer

ORDER = ("sensors", "enrichment", "verdict", "sinks")
BELOW_STAGES = ("in_root", "oci_paths", "inotify")
TRACER = pathlib.Path(tracer.__file__).parent


def runtime_imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    types_only = {id(sub) for node in ast.walk(tree)
                  if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                  for sub in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in types_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return ORDER.index(parts[1]) if parts[0] == "tracer" and len(parts) > 1 \
        and parts[1] in ORDER else None


def test_no_stage_imports_a_later_stage() -> None:
    wrong = []
    for stage, name in enumerate(ORDER):
        for path in sorted((TRACER / name).glob("*.py")):
            wrong += [f"{path.relative_to(TRACER)} imports {m}" for m in runtime_imports(path)
                      if (_stage(m) or 0) > stage]
    assert wrong == []


def test_the_primitives_below_the_stages_import_no_stage() -> None:
    for name in BELOW_STAGES:
        used = [m for m in runtime_imports(TRACER / f"{name}.py") if _stage(m) is not None]
        assert used == [], name


def test_the_sensor_reads_roots_and_oci_paths_through_the_shared_modules() -> None:
    imports = runtime_imports(TRACER / "sensors" / "candidates.py")
    assert "tracer.in_root.open_in_root" in imports
    assert "tracer.oci_paths.oci_path_origin" in imports
