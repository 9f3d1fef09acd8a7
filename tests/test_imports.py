"""The import layers: no import cycle inside moerun (function-local imports included, so
a cycle cannot hide inside a function), and the torch-free layers stay torch-free."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package name -> folder, as pyproject.toml maps them
PACKAGES = {"moerun": ROOT / "moerun", "moerun.kernels": ROOT / "kernels", "moerun.configs": ROOT / "configs"}


def modules() -> dict[str, Path]:
    """Every module name of moerun -> its file (kernels/ and configs/ under their mapped names)."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if any(name.startswith(other + ".") or name == other for other in PACKAGES if other != pkg
                   and other.startswith(pkg + ".")):
                continue  # a folder mapped to another package name
            out[name] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The moerun modules ``name`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base.split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import name": the submodule pkg.name if there is one, else pkg itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle_inside_moerun():
    mods = modules()
    assert "moerun.engine.engine" in mods and "moerun.kernels.fused_moe" in mods and "moerun.plan.cli" in mods
    graph = {n: imports_of(n, p, set(mods)) for n, p in mods.items()}
    assert graph["moerun.generate"] >= {"moerun.runtime", "moerun.engine"}  # the walk sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_function_local_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": imports_of("p.a", tmp_path / "a.py", known), "p.b": imports_of("p.b", tmp_path / "b.py", known)}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


def test_torch_free_layers_import_no_torch():
    code = ("import sys; import moerun.plan, moerun.plan.cli, moerun.args, moerun.options, moerun.config, "
            "moerun.parallel, moerun.dtypes, moerun.hf_config, moerun.eplb; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_every_package_ships_in_the_wheel():
    """pyproject.toml lists packages one by one (kernels/ and configs/ are mapped in): a new
    subpackage missing there works in a checkout and breaks in a wheel."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {".".join(("moerun", *p.parent.relative_to(ROOT / "moerun").parts)).rstrip(".")
               for p in (ROOT / "moerun").rglob("__init__.py")}
    assert present - listed == set(), f"add to pyproject.toml packages: {sorted(present - listed)}"
