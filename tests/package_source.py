"""dora_ext's own source read with `ast`, for the structure tests (test_import_graph.py, test_private_apis.py): its
modules, the dora_ext modules each one imports (at top level or inside a function), and the private (`_name`)
attributes it touches. Nothing here imports dora_ext: the code is read, not run."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dora_ext"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclasses.dataclass
class Import:
    target: str  # the dora_ext module imported (dotted)
    names: tuple[str, ...]  # what `from target import ...` takes (empty for a module imported whole)
    line: int
    local: bool  # inside a function body: runs at call time, not at import


@dataclasses.dataclass
class Module:
    name: str  # dotted: dora_ext.layers.base; a package is its __init__ (dora_ext.layers)
    path: str  # relative to the repository root
    tree: ast.Module
    imports: list[Import]
    bound: dict[str, str]  # local name -> the dora_ext module it is bound to (`from . import ops`: ops)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _functions_of(tree: ast.AST) -> set[int]:
    """ids of the nodes inside a function or lambda body (where an import runs at call time)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def read_module(name: str, path: str, source: str, known: set[str]) -> Module:
    """The imports of dora_ext modules in `source` (module `name`), resolved against the `known` module names.
    `from pkg import x` imports the module pkg.x where one exists, else pkg itself (x is a name defined there)."""
    tree = ast.parse(source, filename=path)
    local = _functions_of(tree)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    imports, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    imports.append(Import(alias.name, (), node.lineno, id(node) in local))
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.partition(".")[0]] = PACKAGE
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            modules = [a for a in node.names if f"{base}.{a.name}" in known]
            names = tuple(a.name for a in node.names if a not in modules)
            for alias in modules:
                imports.append(Import(f"{base}.{alias.name}", (), node.lineno, id(node) in local))
                bound[alias.asname or alias.name] = f"{base}.{alias.name}"
            if names:
                imports.append(Import(base, names, node.lineno, id(node) in local))
    return Module(name, path, tree, imports, bound)


def package_modules(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the dora_ext package, by dotted name (compiled extensions count as known leaf modules)."""
    paths = sorted((root / PACKAGE).rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    known |= {module_name(p, root).split(".abi3")[0].split(".cpython")[0] for p in (root / PACKAGE).rglob("*.so")}
    return {module_name(p, root): read_module(module_name(p, root), str(p.relative_to(root)), p.read_text(), known)
            for p in paths}


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """{module: the modules importing it runs}: each import's target and the packages above it that the importer is
    not inside (importing dora_ext.layers.base from outside runs dora_ext/layers/__init__.py first). The root
    package is no node's dependency by way of a submodule: its __init__ is what imports the rest."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, module in modules.items():
        for imp in module.imports:
            if imp.target not in modules or imp.target == name:
                continue  # a compiled extension (dora_ext._C): no Python imports of its own
            graph[name].add(imp.target)
            parts = imp.target.split(".")
            for k in range(2, len(parts)):
                parent = ".".join(parts[:k])
                if parent in modules and not (name == parent or name.startswith(parent + ".")):
                    graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None for a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """A DAG's floors: 1 for a module importing no dora_ext module, else one above the highest it imports."""
    out: dict[str, int] = {}

    def level(node: str) -> int:
        if node not in out:
            out[node] = 1 + max((level(n) for n in graph[node]), default=0)
        return out[node]

    for node in graph:
        level(node)
    return out


def private_defined(tree: ast.AST) -> set[str]:
    """The private names a module defines: functions, classes, assigned names and attributes (self._x = ...)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return {n for n in out if is_private(n)}


def private_accesses(tree: ast.AST) -> list[ast.Attribute]:
    """Every `<expr>._name` (dunders aside), self's and cls's own included."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_private(n.attr)]


def is_own(node: ast.Attribute) -> bool:
    """self._x, cls._x, super()._x: a class's own member (or its base class's)."""
    v = node.value
    if isinstance(v, ast.Name) and v.id in ("self", "cls"):
        return True
    return isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super"


def root_name(node: ast.AST) -> str | None:
    """The name an attribute chain starts from (torch for torch._C._x), or None (a call, a subscript...)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def third_party_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the top-level package of a module imported under it, for every import outside dora_ext
    (torch, F = torch.nn.functional, bnbF = bitsandbytes.functional)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.partition(".")[0]
                if top != PACKAGE:
                    out[alias.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            top = node.module.partition(".")[0]
            if top != PACKAGE:
                for alias in node.names:
                    out[alias.asname or alias.name] = top
    return out
