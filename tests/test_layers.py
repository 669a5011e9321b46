"""The packages form one-way layers: a module imports only from its own package or a lower layer,
so any layer can be read, tested and reused without the ones above it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vidrep"
# Lower number = lower layer. Packages on one level do not import each other.
LAYERS = {
    "vidrep": -1,  # the root package: config resolvers and the core count, importing nothing of vidrep
    "common": 0,
    "models": 1,
    "losses": 1,
    "data": 2,
    "mining": 3,
    "training": 3,
    "eval": 4,
    "viz": 5,
    "demo": 5,
    # the entry points (python -m vidrep.train|mine|evaluate, the console scripts): compose and run
    "train": 6,
    "mine": 6,
    "evaluate": 6,
    "conf": 7,  # the Hydra configs: YAML only, a package so that an installed wheel carries them
}


def _package(module: str) -> str | None:
    """'vidrep.eval.run' -> 'eval'; 'vidrep' and 'vidrep.__init__' (the root package, which every
    import runs first) -> 'vidrep', below every layer."""
    parts = module.split(".")
    if parts[0] != "vidrep":
        return None
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else "vidrep"


def project_imports() -> list[tuple[str, str, int]]:
    """(importing package, imported module, line) for every vidrep import in the package, at any
    depth (function-level imports count: a lazy upward import is still a cycle)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _package(".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [(own, name, node.lineno, str(rel)) for name in names if name.startswith("vidrep")]
    return found


def upward_imports() -> list[str]:
    wrong = []
    for own, name, line, where in project_imports():
        target = _package(name)
        if target is None or target == own or (target == "vidrep" and own != "vidrep"):
            continue
        if own not in LAYERS or target not in LAYERS:
            wrong.append(f"{where}:{line}: package {own or target!r} has no layer; add it to LAYERS")
        elif LAYERS[target] >= LAYERS[own]:
            wrong.append(f"{where}:{line}: {own} (layer {LAYERS[own]}) imports {name} (layer {LAYERS[target]})")
    return wrong


def test_every_package_has_a_layer():
    packages = (
        {"vidrep"}
        | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
        | {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    )
    assert packages == set(LAYERS), (
        f"packages without a layer: {packages - set(LAYERS)}; layers without a package: {set(LAYERS) - packages}"
    )


def test_no_upward_or_sideways_imports():
    assert upward_imports() == []


def test_common_imports_nothing_of_the_project():
    assert [
        f"{w}:{line}"
        for own, name, line, w in project_imports()
        if own == "common" and name != "vidrep.common" and not name.startswith("vidrep.common.")
    ] == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from vidrep.training.schedule import x", "data (layer 2) imports vidrep.training.schedule (layer 3)"),
        ("import vidrep.eval.report", "data (layer 2) imports vidrep.eval.report (layer 4)"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "vidrep"
    for name in LAYERS:
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("")
    (fake / "data" / "bad.py").write_text(f"def f():\n    {source}\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert any(expected in w for w in upward_imports())


def module_graph(package: str) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports, at any depth} for vidrep.<package>."""
    graph: dict[str, set[str]] = {}
    prefix = f"vidrep.{package}."
    for own, name, _line, where in project_imports():
        if own != package:
            continue
        module = where.replace("/", ".")
        graph.setdefault(module, set())
        if name.startswith(prefix):
            graph[module].add(name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_within_eval():
    """The evaluation's modules import one way (the detection stages above their box, image and
    trainer helpers); function-level imports count, as a lazy import that closes a circle is still one."""
    assert import_cycles(module_graph("eval")) == []


def test_the_cycle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
