"""The core's shape, checked: no import cycle (function-level imports included), the detectors never
import the guard, the torch-free types module stays torch-free, and the public API is pinned."""

from __future__ import annotations

import ast
from pathlib import Path

import ohd_guard

ROOT = Path(ohd_guard.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ohd_guard module ``path`` imports, anywhere in the file (functions included). ``from pkg
    import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules and n != "ohd_guard"}  # the package root only re-exports
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in files}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_no_import_cycles_between_core_modules_function_level_imports_included():
    graph = _graph()
    packages = {m for m in graph if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()}
    cycles = []
    for m in graph:
        for n in graph[m]:
            # a package's __init__ re-exports its submodules; a submodule importing a sibling through the
            # package is the same edge, so package nodes are looked through
            if n in packages:
                continue
            if m in _reachable({k: v - packages for k, v in graph.items()}, n):
                cycles.append(f"{m} -> {n} -> ... -> {m}")
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_the_detectors_never_import_the_guard_or_the_integration_surfaces():
    graph = _graph()
    for m in [m for m in graph if m.startswith("ohd_guard.detectors")]:
        reach = _reachable(graph, m)
        bad = {r for r in reach if r in ("ohd_guard.guard", "ohd_guard.answering", "ohd_guard.worker")
               or r.startswith(("ohd_guard.serve", "ohd_guard.cli"))}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_the_types_module_needs_only_pydantic_and_the_standard_library():
    tree = ast.parse((ROOT / "types.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "typing", "pydantic"}, roots


def test_the_public_api_is_pinned():
    assert sorted(ohd_guard.__all__) == sorted([
        "ArchitectureAdapter", "CalibrationError", "Conversation", "ConversationLimits", "DEFAULT_MODEL",
        "DeflectionScorer", "GuardViolation", "GuardedResponse", "HeadRef", "InternalChanged", "InvalidInputError",
        "MaskSpec", "ModelLoadError", "OhdGuard", "OhdGuardError", "Profile", "ProfileFormatError",
        "ProfileMismatchError", "ScreeningError", "UnsupportedModelError", "Verdict", "calibrate", "get_adapter",
        "head_mask", "load_model", "load_profile", "register_adapter", "search_heads", "to_conversation",
    ])
    for name in ohd_guard.__all__:
        assert getattr(ohd_guard, name) is not None
