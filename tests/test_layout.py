"""The package's layout is its design (docs/CODEMAP.md): these tests read every import statement
of `corpus_anon` (module level and inside functions) and fail on an import circle, on a module-level
import that reaches up the layers, and on driver-side code that imports actor code at load time."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "corpus_anon"

# Layers, lowest first. A module may import its own layer and lower ones at module level; a higher
# one only inside a function (how the driver names the actor class it hands to Ray).
LAYERS: dict[str, int] = {
    "base": 0,  # corpus_anon/{errors,config,secret}.py and the package itself
    "io": 1,
    "models": 2,
    "actor": 3,
    "run": 4,
    "release": 5,
    "finetune": 6,
    "entry": 7,  # corpus_anon/{cli,demo}.py
}
BASE = {"corpus_anon", "corpus_anon.errors", "corpus_anon.config", "corpus_anon.secret"}
ENTRY = {"corpus_anon.cli", "corpus_anon.demo"}
# Driver folders: run on the Ray driver, never load actor or model code when imported.
DRIVER_LAYERS = ("base", "io", "run", "release")


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module} sits in no layer of docs/CODEMAP.md: place it in a folder or name it here")


def imports(mods: dict[str, pathlib.Path]) -> dict[str, list[tuple[str, bool, int]]]:
    """Each module's imports of the package: (imported module, at module level?, line)."""
    graph: dict[str, list[tuple[str, bool, int]]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        # An import runs when the module loads unless a function (or lambda) encloses it; one in a
        # module-level `try:`, `if:` or class body loads with the module.
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        # statements under `if TYPE_CHECKING:` run for type checkers only
        typing_only = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only.update(id(n) for n in ast.walk(node))
        found = []
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("corpus_anon"):
                    found.append((t, id(node) not in in_function, node.lineno))
        graph[name] = sorted(set(found), key=lambda e: e[2])
    return graph


def find_cycle(graph: dict[str, list[tuple[str, bool, int]]]) -> list[str] | None:
    """One import circle as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t, _, _ in graph[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cyc = visit(t)
                if cyc:
                    return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            cyc = visit(m)
            if cyc:
                return cyc
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool, int]]]:
    return imports(modules())


def test_every_module_sits_in_a_layer(graph):
    for m in graph:
        layer(m)


def test_no_import_circle(graph):
    cyc = find_cycle(graph)
    assert cyc is None, "import circle (module level or inside functions): " + " -> ".join(cyc)


def test_module_level_imports_never_reach_up(graph):
    bad = [f"{m} (line {line}) imports {t} at module level: {layer(m)} may not load {layer(t)}"
           for m, edges in graph.items() for t, top, line in edges
           if top and LAYERS[layer(t)] > LAYERS[layer(m)]]
    assert not bad, "\n".join(bad)


def test_driver_side_loads_no_actor_or_model_code(graph):
    bad = [f"{m} (line {line}) imports {t} at module level" for m, edges in graph.items()
           if layer(m) in DRIVER_LAYERS for t, top, line in edges
           if top and layer(t) in ("models", "actor")]
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_circle_and_an_upward_import():
    """The checks above fail on what they are for (a made-up graph)."""
    g = {"corpus_anon.run.a": [("corpus_anon.release.b", False, 1)],
         "corpus_anon.release.b": [("corpus_anon.run.a", True, 2)]}
    assert find_cycle(g) == ["corpus_anon.run.a", "corpus_anon.release.b", "corpus_anon.run.a"]
    assert LAYERS[layer("corpus_anon.release.b")] > LAYERS[layer("corpus_anon.run.a")]


def test_the_parser_sees_imports_at_load_time_and_inside_functions(graph, tmp_path):
    """Edges the checks rely on, read from the package as it is, and from a small package whose every
    kind of import is known: if the parser stopped seeing edges, the checks above would pass on nothing."""
    assert ("corpus_anon.models.facetrack", True) in {(t, top) for t, top, _ in graph["corpus_anon.actor.anonymize"]}
    assert ("corpus_anon.actor.worker", False) in {(t, top) for t, top, _ in graph["corpus_anon.run.pipeline"]}
    pkg = tmp_path / "corpus_anon"
    (pkg / "run").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "run" / "__init__.py").write_text("")
    (pkg / "run" / "b.py").write_text("")
    (pkg / "run" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "try:\n    from corpus_anon.run import b\nexcept ImportError:\n    b = None\n"
        "if TYPE_CHECKING:\n    from corpus_anon import config\n"
        "class K:\n    from . import b as bb\n"
        "def f():\n    import corpus_anon.run.b\n")
    mods = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(tmp_path).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = imports(mods)["corpus_anon.run.a"]
    assert sorted((t, top) for t, top, _ in edges) == [("corpus_anon.run.b", False), ("corpus_anon.run.b", True),
                                                       ("corpus_anon.run.b", True)]


def test_the_circle_named_in_issue_16_is_gone(graph):
    """extract -> pipeline -> release -> extract/pipeline was the one circle of the flat layout."""
    reach: dict[str, set[str]] = {}

    def closure(m: str) -> set[str]:
        if m not in reach:
            reach[m] = set()
            for t, _, _ in graph[m]:
                reach[m] |= {t} | closure(t)
        return reach[m]

    for m in ("corpus_anon.run.pipeline", "corpus_anon.release.publish"):
        assert "corpus_anon.finetune.extract" not in closure(m)
    assert "corpus_anon.run.pipeline" not in closure("corpus_anon.release.publish")


def test_the_code_map_names_every_folder_and_module():
    """docs/CODEMAP.md is the map a newcomer reads: every folder has its row and every module is named
    in it, so a module added without a place on the map fails here."""
    text = (PACKAGE.parent / "docs" / "CODEMAP.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    missing = []
    for name, path in modules().items():
        if path.name == "__init__.py" and name != "corpus_anon":
            folder = name.split(".")[-1]
            if f"`{folder}/`" not in rows:
                missing.append(f"folder {folder}/ has no row")
            continue
        stem = path.stem
        folder = path.parent.name
        row = rows.get(f"`{folder}/`") if folder != "corpus_anon" else " ".join(
            line for key, line in rows.items() if key.startswith("`corpus_anon/`"))
        if stem != "__init__" and (row is None or f"`{stem}`" not in row and f"`{stem}.py`" not in row):
            missing.append(f"{name} is not on the map")
    # and the other way: every module the map names exists in its folder
    for key, line in rows.items():
        folder = PACKAGE / key.strip("`").removeprefix("corpus_anon/").rstrip("/") if key != "`corpus_anon/`" else PACKAGE
        for named in re.findall(r"`([a-z_]+)(?:\.py)?`", line.split("|")[3]):
            if not (folder / f"{named}.py").is_file():
                missing.append(f"the map names {key.strip('`')}{named}, which does not exist")
    assert not missing, "\n".join(missing)
