"""The layering holds by construction: ``seed`` <- ``pipeline`` stages <- front ends (CLI, ``flows``).

Read from the source with ``ast`` (every import, also those inside functions), so a violation fails
here before anyone runs the code path that contains it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRONT_ENDS = {"pipeline.cli"}  # the command line sits above the stages, beside flows/


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package (pipeline/x.py -> pipeline)
                module = ".".join([path.parent.name, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out += [(module, id(node) in top)]
            out += [(f"{module}.{alias.name}", id(node) in top) for alias in node.names]
    return out


def _modules(package: str) -> dict[str, Path]:
    return {f"{package}.{p.stem}": p for p in sorted((ROOT / package).glob("*.py")) if p.stem != "__init__"}


def test_the_library_imports_no_stage_and_no_front_end() -> None:
    bad = [(name, imported) for name, path in _modules("seed").items() for imported, _ in _imports(path)
           if imported.split(".")[0] in ("pipeline", "flows")]
    assert bad == []


def test_no_stage_imports_another_stage() -> None:
    stages = _modules("pipeline")
    bad = [(name, imported) for name, path in stages.items() if name not in FRONT_ENDS
           for imported, _ in _imports(path) if imported.split(".")[0] == "pipeline"]
    assert bad == []
    up = [(name, imported) for name, path in stages.items() for imported, _ in _imports(path)
          if imported.split(".")[0] == "flows"]
    assert up == []  # the CLI and the flows are siblings: neither builds on the other
    flows = [(name, imported) for name, path in _modules("flows").items() for imported, _ in _imports(path)
             if imported.startswith("pipeline.cli")]
    assert flows == []
    assert set(stages) - FRONT_ENDS == {"pipeline.teacher", "pipeline.bank", "pipeline.student", "pipeline.pretrain",
                                        "pipeline.evaluate", "pipeline.export"}


def test_only_flows_import_prefect_and_faiss_is_imported_where_used() -> None:
    for package in ("seed", "pipeline"):
        for name, path in _modules(package).items():
            for imported, top in _imports(path):
                assert imported.split(".")[0] != "prefect", (name, imported)
                assert not (imported.split(".")[0] == "faiss" and top), (name, "imports faiss at module level")


def test_no_monkeypatching_of_project_code() -> None:
    """Tests and benchmarks use the seams (teacher loaders, objective and source factories), not patches."""
    pattern = re.compile(r"monkeypatch\.setattr|mock\.patch|cache_clear\(|\bsetattr\(|"
                         r"^\s*(seed|pipeline|flows|[a-z_]*stage|[A-Z])\.[A-Za-z_][\w.]*\s*=[^=]", re.M)
    offenders = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
                 for folder in ("tests", "bench") for path in sorted((ROOT / folder).rglob("*.py"))
                 if path.name != "test_layering.py"
                 for text in [path.read_text()] for m in pattern.finditer(text)]
    assert offenders == []


def test_no_code_points_outside_the_repository() -> None:
    pattern = re.compile(r"(DESIGN|ECOSYSTEM|STYLE)\.md|\.\./shared")
    files = [p for folder in ("seed", "pipeline", "flows", "bench", "tests", "scripts") for p in (ROOT / folder).rglob("*")
             if p.suffix in (".py", ".sh", ".yaml", ".toml") and p.name != "test_layering.py"]
    files += [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "storage.yaml"]
    assert [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text())] == []
