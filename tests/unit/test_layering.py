"""The package's folders are its architecture: this test keeps them so.

- ``agent.shared`` imports nothing from ``agent.sensor`` or ``agent.collector``;
- ``agent.sensor`` and ``agent.collector`` never import each other;
- no import cycle exists anywhere in the package.

Every import counts, the lazy ones inside functions too: a cycle that only
closes at run time is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import agent

PACKAGE_DIR = Path(agent.__file__).parent
LAYERS = ("agent.shared", "agent.sensor", "agent.collector")
FORBIDDEN = {
    "agent.shared": ("agent.sensor", "agent.collector"),
    "agent.sensor": ("agent.collector",),
    "agent.collector": ("agent.sensor",),
}


def package_sources() -> dict[str, str]:
    """Module name -> source text, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def _imports(module: str, source: str, known: set[str]) -> Iterator[str]:
    is_pkg = module in known and any(m.startswith(module + ".") for m in known)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    known = set(sources)
    return {m: {t for t in _imports(m, src, known) if t in known and t != m} for m, src in sources.items()}


def _layer(module: str) -> str:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), "")


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    out = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            if _layer(t) in FORBIDDEN.get(_layer(m), ()):
                out.append(f"{m} imports {t}")
    return out


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_import_only_downwards() -> None:
    assert layer_violations(import_graph(package_sources())) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(package_sources())) == []


def test_every_module_sits_in_a_layer() -> None:
    top = {"agent", "agent.cli", "agent.quickstart"}
    assert sorted(m for m in package_sources() if m not in top and not _layer(m)) == []


def test_the_checks_catch_a_wrong_import() -> None:
    sources = package_sources()
    sources["agent.shared.rule"] += "\nfrom agent.sensor.outbox import AgentStore\n"
    graph = import_graph(sources)
    assert "agent.shared.rule imports agent.sensor.outbox" in layer_violations(graph)
    assert any("agent.shared.rule" in c for c in cycles(graph))  # outbox imports the rule


def test_a_lazy_import_between_sensor_and_collector_is_caught() -> None:
    sources = package_sources()
    sources["agent.collector.evaluate"] += "\ndef f():\n    from agent.sensor import runtime\n"
    assert "agent.collector.evaluate imports agent.sensor.runtime" in layer_violations(import_graph(sources))


def test_a_relative_import_resolves() -> None:
    sources = {
        "agent.shared.wire": "from . import encode\n",
        "agent.shared.wire.encode": "from .. import rule\n",
    }
    sources["agent.shared.rule"] = ""
    graph = import_graph(sources)
    assert graph["agent.shared.wire"] == {"agent.shared.wire.encode"}
    assert graph["agent.shared.wire.encode"] == {"agent.shared.rule"}


# The byte parsers on the hot path are one flat loop each on purpose (a call
# per field or record costs more than the work); every other function stays short.
LONG_ON_PURPOSE = {
    ("agent.sensor.sources.fanotify.abi", "parse_buffer"),
    ("agent.shared.wire.decode", "_event_fast"),
}
MAX_LINES = 60


def test_functions_stay_short_but_the_hot_byte_parsers() -> None:
    long = []
    for module, source in package_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_LINES and (module, node.name) not in LONG_ON_PURPOSE:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []
