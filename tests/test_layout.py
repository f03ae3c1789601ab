"""The house rules of the source tree, checked from the code itself (no imports are executed).

* the library's module graph has no cycle, counting imports inside functions too;
* no module imports another module's private (``_name``) attributes;
* one atomic writer: only ``internlm_jax/files.py`` renames files into place;
* one parameter-flattening helper: only ``internlm_jax/arrays.py`` flattens NNX state;
* the README's layout section names every module of the package.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "internlm_jax"
SOURCES = [p for d in ("internlm_jax", "conversion", "examples", "bench", "tests") for p in (ROOT / d).rglob("*.py")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, imported attribute or None) for every import statement in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                yield target, alias.name


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, attr in imports(path):
            dep = f"{target}.{attr}" if attr and f"{target}.{attr}" in modules else target
            if dep in modules and dep != name and dep != "internlm_jax":
                graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_library_imports_have_no_cycle():
    graph = library_graph()
    assert "internlm_jax.checkpoint" in graph["internlm_jax.model"]  # the graph sees what it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_are_imported_across_modules():
    offenders = []
    for path in SOURCES:
        for target, attr in imports(path):
            if attr and attr.startswith("_") and not attr.startswith("__"):
                offenders.append(f"{path.relative_to(ROOT)}: from {target} import {attr}")
    assert not offenders, "\n".join(offenders)


def calls(path: Path, dotted: str) -> int:
    owner, attr = dotted.split(".")
    return sum(1 for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr == attr
               and isinstance(node.value, ast.Name) and node.value.id == owner)


def test_one_atomic_writer_and_one_flattening_helper():
    library = list(PACKAGE.rglob("*.py")) + list((ROOT / "conversion").rglob("*.py"))
    renames = sorted(str(p.relative_to(ROOT)) for p in library if calls(p, "os.replace") or calls(p, "os.rename"))
    assert renames == ["internlm_jax/files.py"]
    flattens = sorted(str(p.relative_to(ROOT)) for p in library if calls(p, "nnx.to_flat_state"))
    assert flattens == ["internlm_jax/arrays.py"]


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
               and p.name not in layout]
    assert not missing, f"README layout does not mention {missing}"


def test_notebooks_are_committed_without_outputs():
    import json

    notebooks = sorted((ROOT / "examples").glob("*.ipynb"))
    assert notebooks, "examples/quickstart.ipynb is missing"
    for nb in notebooks:
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), nb.name
