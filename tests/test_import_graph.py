"""dora_ext's import graph is a DAG: every module stands on one level above all it imports, no import hides inside a
function to dodge a cycle, and no module reaches into another's private (`_name`) members. Read from the source with
ast (tests/package_source.py), so a new cycle fails here naming it, whether the import is at top level or not."""

import ast

from package_source import (
    find_cycle, import_graph, is_own, is_private, levels, package_modules, private_accesses, private_defined,
    read_module, root_name, third_party_names,
)

#: function-local imports of dora_ext modules allowed: (file, imported module) -> why. Empty: every dependency
#: between dora_ext's modules is a top-level import, so the graph read from them is the whole truth.
LOCAL_IMPORTS: dict[tuple[str, str], str] = {}

#: private names one dora_ext module may import from another: (file, module) -> why
PRIVATE_IMPORTS = {
    ("dora_ext/__init__.py", "dora_ext._C"): "the package loads its compiled library (registers torch.ops.dora_ext)",
}

#: private attributes one module may touch on another's objects, where a name collides with one dora_ext defines:
#: (file, attribute) -> why
PRIVATE_ATTRIBUTES = {
    ("dora_ext/peft_variants.py", "_embed"): "PEFT's Embedding._embed, in peft_private.PRIVATE (not layers' own)",
}

MODULES = package_modules()
GRAPH = import_graph(MODULES)


def _where(module, line):
    return f"{module.path}:{line}"


# ---------------------------------------------------------------------------------------------- the checks' checks
def _modules_from(sources: dict[str, str]):
    """Modules from in-memory sources ({dotted name: code}), as package_modules reads files (a name with modules
    under it is a package: its __init__.py)."""
    known = set(sources)

    def path(name):
        package = any(other.startswith(name + ".") for other in known)
        return name.replace(".", "/") + ("/__init__.py" if package else ".py")

    return {name: read_module(name, path(name), code, known) for name, code in sources.items()}


def test_the_reader_sees_a_cycle_through_a_function_local_import():
    modules = _modules_from({
        "dora_ext.a": "from . import b\n",
        "dora_ext.b": "def f():\n    from .a import thing\n    return thing\n",
        "dora_ext.c": "from .b import f\n",
    })
    graph = import_graph(modules)
    assert graph == {"dora_ext.a": {"dora_ext.b"}, "dora_ext.b": {"dora_ext.a"}, "dora_ext.c": {"dora_ext.b"}}
    assert find_cycle(graph) in (["dora_ext.a", "dora_ext.b", "dora_ext.a"], ["dora_ext.b", "dora_ext.a", "dora_ext.b"])
    local = [(name, imp.target) for name, m in modules.items() for imp in m.imports if imp.local]
    assert local == [("dora_ext.b", "dora_ext.a")]
    del graph["dora_ext.b"]
    graph["dora_ext.b"] = set()
    assert find_cycle(graph) is None and levels(graph) == {"dora_ext.a": 2, "dora_ext.b": 1, "dora_ext.c": 2}


def test_the_reader_resolves_absolute_imports_and_packages_above_a_submodule():
    modules = _modules_from({
        "dora_ext.x": "import dora_ext.pkg.leaf as leaf\n",
        "dora_ext.pkg": "from . import leaf\n",
        "dora_ext.pkg.leaf": "from dora_ext import x\n",
    })
    graph = import_graph(modules)
    # x imports pkg.leaf, which runs pkg/__init__ first; leaf (inside pkg) does not depend on pkg by that
    assert graph == {"dora_ext.x": {"dora_ext.pkg.leaf", "dora_ext.pkg"}, "dora_ext.pkg": {"dora_ext.pkg.leaf"},
                     "dora_ext.pkg.leaf": {"dora_ext.x"}}
    assert find_cycle(graph) is not None


# ----------------------------------------------------------------------------------------------- the package
def test_the_package_is_read_whole():
    assert {"dora_ext", "dora_ext.ops", "dora_ext.layers", "dora_ext.layers.base", "dora_ext.serving",
            "dora_ext.mixed_batch", "dora_ext.model"} <= set(MODULES)
    assert "dora_ext.mixed_batch" in GRAPH["dora_ext.layers.base"]  # `from .. import mixed_batch`
    assert GRAPH["dora_ext.serving"] == {"dora_ext.mixed_batch", "dora_ext.model_state"}


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "dora_ext's imports form a cycle: " + " -> ".join(cycle) + " (split the module that " \
        "makes the loop, so each stands on one level; tests/package_source.py reads the imports)"


def test_no_function_local_import_of_a_dora_ext_module():
    found = [f"{_where(m, imp.line)} imports {imp.target}" for m in MODULES.values() for imp in m.imports
             if imp.local and (m.path, imp.target) not in LOCAL_IMPORTS and imp.target in MODULES]
    assert not found, ("function-local imports of dora_ext modules (they hide dependencies from the import graph; "
                       "import at top level, or list one in LOCAL_IMPORTS with its reason): " + "; ".join(found))


def test_the_levels_put_each_module_above_what_it_imports():
    floor = levels(GRAPH)
    assert floor["dora_ext"] == max(floor.values())  # the package's face imports the rest
    assert floor["dora_ext.mixed_batch"] < floor["dora_ext.layers.base"] < floor["dora_ext.model_state"] \
        < floor["dora_ext.serving"]


# ------------------------------------------------------------------------------------------- private members
def private_imports(modules) -> list[str]:
    """Imports of another dora_ext module's private names (`from .ops import _x`, `from . import _mod`)."""
    found = []
    for m in modules.values():
        for imp in m.imports:  # `from dora_ext import _C` reads as the module dora_ext._C once it is built
            taken = [f"{imp.target}.{n}" for n in imp.names if is_private(n)]
            if not imp.names and is_private(imp.target.rpartition(".")[2]):
                taken.append(imp.target)
            found += [f"{_where(m, imp.line)}: {t}" for t in taken if (m.path, t) not in PRIVATE_IMPORTS]
    return found


def private_reaches(modules) -> list[str]:
    """`ops._x` where ops is a dora_ext module, and `obj._x` of a private name that another dora_ext module defines
    and this one does not (layer._norm_cache in serving.py): both belong to the owning module."""
    defined = {name: private_defined(m.tree) for name, m in modules.items()}
    found = []
    for name, m in modules.items():
        third_party = third_party_names(m.tree)
        elsewhere = set().union(*(d for other, d in defined.items() if other != name)) - defined[name]
        for node in private_accesses(m.tree):
            if is_own(node):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in m.bound:
                found.append(f"{_where(m, node.lineno)}: {ast.unparse(node)} ({m.bound[node.value.id]})")
            elif node.attr in elsewhere and (m.path, node.attr) not in PRIVATE_ATTRIBUTES:
                if root_name(node) in third_party:  # torch._check: torch's own name, not a dora_ext module's
                    continue
                owners = sorted(other for other, d in defined.items() if node.attr in d and other != name)
                found.append(f"{_where(m, node.lineno)}: {ast.unparse(node)} (defined in {', '.join(owners)})")
    return found


def test_the_private_checks_see_each_kind_of_reach():
    modules = _modules_from({
        "dora_ext.owner": "class Layer:\n    def __init__(self):\n        self._cache = {}\n_table = {}\n",
        "dora_ext.user": ("import torch\nfrom . import owner\nfrom .owner import _table\n"
                          "def f(layer):\n    torch._check(True)\n    return layer._cache, owner._table, layer._own\n"),
    })
    assert private_imports(modules) == ["dora_ext/user.py:3: dora_ext.owner._table"]
    assert private_reaches(modules) == ["dora_ext/user.py:6: layer._cache (defined in dora_ext.owner)",
                                        "dora_ext/user.py:6: owner._table (dora_ext.owner)"]


def test_no_module_imports_another_modules_private_name():
    found = private_imports(MODULES)
    assert not found, "imports of another dora_ext module's private names (give them a public name): " + \
        "; ".join(found)


def test_no_module_reaches_into_another_modules_private_members():
    found = private_reaches(MODULES)
    assert not found, "reaches into another dora_ext module's private members (give the owner a public method, " \
        "or keep the code in the owning module): " + "; ".join(found)
