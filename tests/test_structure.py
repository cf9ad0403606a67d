"""The package's architecture, read from its source with ``ast`` (nothing is imported).

Layers, top to bottom, each importing only downwards: the command line
(``app.py``, ``cli/``), the engines (``inference``, ``example``,
``evaluation``), ``pipelines/`` and ``baselines/``, ``models/`` (networks
only), and the leaves (``directions``, ``gradients``, ``normalization``,
``image_processor``, ``data/io``, ``tensor``, ``masking``).

An import inside a function is an edge of the import graph like one at the
top of a module: it runs later, but the two modules still depend on each
other, and such a cycle breaks as soon as someone moves the import up.
Parent packages that Python runs implicitly (``qid2_diffusers/__init__.py``
before any submodule) are not edges: only what a module names.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "qid2_diffusers"

#: What a network module must not know about: volumes, files, samplers, methods, commands.
NOT_FOR_MODELS = ("pipelines", "upsampling", "baselines", "evaluation", "cli", "inference")
#: Longest function allowed in ``cli/``: a command line only parses, calls an engine and prints.
CLI_MAX_LINES = 60
#: Argument-parser builders are long lists of options, not logic.
PARSER_BUILDER = re.compile(r"^add_(parser|\w+_arguments)$")


@dataclass(frozen=True)
class Import:
    """One import statement: who imports, the resolved module, the names taken from it, where."""

    path: Path
    line: int
    importer: str
    module: str
    names: tuple[str, ...]


def module_name(path: Path, root: Path) -> str:
    """Dotted name of a source file under ``root`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import of a file, at any depth, relative ones resolved against ``root``."""
    importer = module_name(path, root)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, importer, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            found.append(Import(path, node.lineno, importer, module, tuple(a.name for a in node.names)))
    return found


def package_files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from x import submodule`` is an edge to the submodule)."""
    files = package_files(root, package)
    modules = {module_name(f, root) for f in files}
    graph = {m: set() for m in modules}
    for f in files:
        for imp in imports_of(f, root):
            targets = [f"{imp.module}.{n}" if f"{imp.module}.{n}" in modules else imp.module for n in imp.names]
            graph[imp.importer].update(t for t in targets or [imp.module] if t in modules and t != imp.importer)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _within(name: str, packages: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def model_layer_violations(root: Path, package: str) -> list[str]:
    """Imports of ``models/`` from the layers above it (``from .. import pipelines`` included)."""
    forbidden = [f"{package}.{name}" for name in NOT_FOR_MODELS]
    return [
        f"{imp.path.relative_to(root)}:{imp.line} imports {imp.module}"
        for f in package_files(root, package)
        if _within(module_name(f, root), [f"{package}.models"])
        for imp in imports_of(f, root)
        if _within(imp.module, forbidden) or any(_within(f"{imp.module}.{n}", forbidden) for n in imp.names)
    ]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(files: list[Path], root: Path) -> list[str]:
    """Imports of a leading-underscore name, or from a leading-underscore module."""
    found = []
    for f in files:
        for imp in imports_of(f, root):
            names = [n for n in imp.names if _private(n)]
            if names or any(_private(part) for part in imp.module.split(".")):
                what = f"{', '.join(names)} from {imp.module}" if names else imp.module
                found.append(f"{imp.path.relative_to(root)}:{imp.line} imports {what}")
    return found


def long_functions(files: list[Path], root: Path, max_lines: int = CLI_MAX_LINES) -> list[str]:
    """Functions (methods and nested ones too) longer than ``max_lines``, argument-parser builders aside."""
    return [
        f"{f.relative_to(root)}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines"
        for f in files
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > max_lines
        and not PARSER_BUILDER.match(node.name)
    ]


def checked_files(root: Path) -> list[Path]:
    """Where the private-name rule applies: the package, the demo, training and the benchmarks."""
    files = package_files(root, PACKAGE) + [root / "app.py"]
    return files + sorted((root / "training").rglob("*.py")) + sorted((root / "benchmarks").rglob("*.py"))


def test_the_package_has_no_import_cycle():
    graph = import_graph(REPO, PACKAGE)
    assert len(graph) > 40 and f"{PACKAGE}.inference" in graph
    assert import_cycles(graph) == []


def test_models_are_networks_only():
    assert model_layer_violations(REPO, PACKAGE) == []


def test_no_module_imports_a_private_name():
    assert private_imports(checked_files(REPO), REPO) == []


def test_cli_functions_are_short():
    cli = sorted((REPO / PACKAGE / "cli").glob("*.py"))
    assert len(cli) >= 6
    assert long_functions(cli, REPO) == []


def test_the_engines_sit_below_the_command_line():
    graph = import_graph(REPO, PACKAGE)
    engines = [m for m in graph if _within(m, [f"{PACKAGE}.{e}" for e in ("inference", "example", "evaluation")])]
    assert sorted(m for m in engines for t in graph[m] if t.startswith(f"{PACKAGE}.cli")) == []
    assert f"{PACKAGE}.inference" in graph[f"{PACKAGE}.cli.upsample"]
    assert f"{PACKAGE}.evaluation.benchmark" in graph[f"{PACKAGE}.cli.benchmark"]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checks_find_what_they_guard_against(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(60))  # a function of 61 lines with its def
    one_less = body[body.index("\n") + 1 :]
    cli = f"def add_parser(sub):\n{body}{body}\n\ndef run(args):\n{body}\n\ndef short(args):\n{one_less}"
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import thing\n",
            "pkg/a.py": "from .b import helper\nthing = 1\n",
            "pkg/b.py": "def helper():\n    from . import a\n    return a.thing\n",
            "pkg/c.py": "from .a import _hidden\nfrom pkg.b import helper\n",
            "pkg/d.py": "import pkg._internal\n",
            "pkg/_internal.py": "",
            "pkg/leaf.py": "import numpy\n",
            "pkg/models/__init__.py": "",
            "pkg/models/net.py": "def build():\n    from ..pipelines import Pipe\n    return Pipe\n",
            "pkg/models/ok.py": "from ..leaf import numpy\n",
            "pkg/pipelines/__init__.py": "Pipe = 1\n",
            "pkg/cli/__init__.py": "",
            "pkg/cli/cmd.py": cli,
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
    graph["pkg.b"].clear()
    assert import_cycles(graph) == []

    assert model_layer_violations(tmp_path, "pkg") == ["pkg/models/net.py:2 imports pkg.pipelines"]

    found = private_imports(package_files(tmp_path, "pkg"), tmp_path)
    assert found == ["pkg/c.py:1 imports _hidden from pkg.a", "pkg/d.py:1 imports pkg._internal"]

    run_line = cli.splitlines().index("def run(args):") + 1
    found = long_functions([tmp_path / "pkg" / "cli" / "cmd.py"], tmp_path)
    assert found == [f"pkg/cli/cmd.py:{run_line} run is 61 lines"]
