"""The package's layers. `make test` runs import-linter on the contracts in pyproject.toml (layers, no cycles);
this checks what those contracts cannot express."""

import grimp


def test_no_module_imports_a_package_it_belongs_to():
    """A package's __init__ imports its modules (statically, or by discovery as distillers does); a module that
    imports its own package back, e.g. ``from . import register_method``, closes a cycle that import-linter's
    acyclic_siblings contract does not see (it compares siblings, not a package with its modules)."""
    graph = grimp.build_graph("crossdistill", cache_dir=None)
    upward = sorted(
        f"{module} -> {imported}"
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if module.startswith(imported + ".")
    )
    assert upward == []
