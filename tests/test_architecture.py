"""The package's walls, read from its imports (``ast``, no third-party tool).

Who may import whom is what keeps the sides apart: the client and the server share only the
link, crypto and aggregation are pure math that no transport can reach into, and one module
reads the distributed environment. Each wall is one test, so a break names itself.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flglm"
MAX_LINES = 450

DIST_VARIABLE = re.compile(r"^(RANK|WORLD_SIZE|GROUP_RANK|ROLE_RANK|ROLE_WORLD_SIZE|LOCAL_\w+|MASTER_\w+)$")
"""The variables torchrun (or a user starting a process by hand) sets for the distributed job."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(name: str) -> ast.Module:
    return ast.parse(_modules()[name].read_text(), filename=str(_modules()[name]))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, *, typing: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that runs (module level or inside a function); with ``typing``, also those
    only type checkers see (``if TYPE_CHECKING:``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child) and not typing:
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), typing=typing)
        else:
            yield from _import_nodes(child, typing=typing)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = _modules()[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@cache
def imports_of(module: str, *, typing: bool = False) -> frozenset[str]:
    """Every module ``module`` imports: flglm modules by their own name (``from pkg import sub``
    names the submodule), others by the name written; ``typing``: also type-checking-only imports."""
    found: set[str] = set()
    for node in _import_nodes(_tree(module), typing=typing):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        target = _resolve(module, node)
        found.add(target)
        for alias in node.names:
            if f"{target}.{alias.name}" in _modules():
                found.add(f"{target}.{alias.name}")
    return frozenset(found)


def _flglm_imports(module: str) -> set[str]:
    """The flglm modules ``module`` imports, type-checking imports included: a circle only type
    checkers see still ties two modules into one (a package name counts as its ``__init__``)."""
    return {m for m in imports_of(module, typing=True) if m in _modules() and m != module}


@cache
def reaches(module: str) -> frozenset[str]:
    """Every module that importing ``module`` runs, transitively (flglm modules and third-party names)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for imported in imports_of(current):
            if imported not in seen:
                seen.add(imported)
                if imported in _modules():
                    todo.append(imported)
    return frozenset(seen)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _of(package: str) -> list[str]:
    return [m for m in _modules() if _in(m, package)]


# ----------------------------------------------------------------------------------------- walls
def test_the_package_is_where_the_test_looks() -> None:
    """Guards the other tests against passing on an empty tree."""
    for package in ("flglm.link", "flglm.client", "flglm.server", "flglm.aggregation", "flglm.crypto", "flglm.models"):
        assert _of(package), f"{package} has no modules"
    assert "flglm.distributed" in _modules()
    # positive control of the walls' reach: the training job imports both sides, through other modules too
    assert any(_in(m, "flglm.client") for m in reaches("flglm.jobs.train"))
    assert any(_in(m, "flglm.server") for m in reaches("flglm.jobs.serve"))
    assert "torch.distributed.rpc" in reaches("flglm.link.transport")


@pytest.mark.parametrize(("side", "other"), [("flglm.client", "flglm.server"), ("flglm.server", "flglm.client")])
def test_client_and_server_never_import_each_other(side: str, other: str) -> None:
    broken = {m: sorted(i for i in reaches(m) if _in(i, other)) for m in _of(side)}
    broken = {m: found for m, found in broken.items() if found}
    assert not broken, f"{side} reaches {other} (directly or through another module): {broken}"


def test_the_link_holds_only_what_both_sides_share() -> None:
    """link/ imports neither side (nor the jobs that run them): both sides import it."""
    forbidden = ("flglm.client", "flglm.server", "flglm.jobs", "flglm.callbacks", "flglm.cli")
    broken = {m: sorted(i for i in reaches(m) if any(_in(i, f) for f in forbidden)) for m in _of("flglm.link")}
    broken = {m: found for m, found in broken.items() if found}
    assert not broken, f"flglm.link reaches side-specific code: {broken}"


@pytest.mark.parametrize("package", ["flglm.crypto", "flglm.aggregation"])
def test_crypto_and_aggregation_import_no_rpc_client_or_server_code(package: str) -> None:
    forbidden = ("torch.distributed", "flglm.client", "flglm.server", "flglm.jobs", "flglm.link.transport", "flglm.link.rpc_entries")
    broken = {m: sorted(i for i in reaches(m) if any(_in(i, f) for f in forbidden)) for m in _of(package)}
    broken = {m: found for m, found in broken.items() if found}
    assert not broken, f"{package} reaches RPC, collectives, client or server code: {broken}"


def test_models_import_no_rpc() -> None:
    forbidden = ("torch.distributed", "flglm.client", "flglm.server", "flglm.jobs", "flglm.link.transport", "flglm.link.rpc_entries")
    broken = {m: sorted(i for i in reaches(m) if any(_in(i, f) for f in forbidden)) for m in _of("flglm.models")}
    broken = {m: found for m, found in broken.items() if found}
    assert not broken, f"flglm.models reaches RPC or a side's code: {broken}"


def test_nothing_in_the_library_imports_scripts_or_tests() -> None:
    """callbacks the library needs live in flglm/callbacks; launch/, benchmarks/ and tests/ are users of the library."""
    outside = ("callbacks", "launch", "benchmarks", "tests", "conftest")
    broken = {m: sorted(i for i in imports_of(m) if i.split(".")[0] in outside) for m in _modules()}
    broken = {m: found for m, found in broken.items() if found}
    assert not broken, f"library modules import scripts or tests: {broken}"
    assert not (ROOT / "callbacks").exists() or not any((ROOT / "callbacks").glob("*.py")), "callbacks/ outside the package is back"


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The circles of an import graph (Tarjan's strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_circle_finder_finds_circles() -> None:
    """Positive control on a made-up graph: a -> b -> c -> a is one circle, d -> a is none."""
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_no_import_circles_inside_the_package() -> None:
    cycles = _cycles({m: sorted(_flglm_imports(m)) for m in _modules()})
    assert not cycles, f"import circles (each a set of modules that import one another): {cycles}"


# ------------------------------------------------------------------- the distributed environment
def _env_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, variable) of each read of a distributed variable from this process's environment."""
    reads = []

    def environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (isinstance(node, ast.Name) and node.id == "environ")

    def name(node: ast.AST) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and environ(node.value) and isinstance(node.ctx, ast.Load):
            reads.append((node.lineno, name(node.slice)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if (environ(node.func.value) and node.func.attr in ("get", "pop", "setdefault")) or node.func.attr == "getenv":
                reads.append((node.lineno, name(node.args[0])))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getenv" and node.args:
            reads.append((node.lineno, name(node.args[0])))
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and any(environ(c) for c in node.comparators):
            reads.append((node.lineno, name(node.left)))
    return [(line, var) for line, var in reads if var is not None and DIST_VARIABLE.match(var)]


def test_only_the_distributed_module_reads_the_distributed_environment() -> None:
    reads = {m: _env_reads(_tree(m)) for m in _modules() if m != "flglm.distributed"}
    reads = {m: r for m, r in reads.items() if r}
    assert not reads, f"reads of the distributed environment outside flglm/distributed.py: {reads}"
    assert _env_reads(_tree("flglm.distributed")), "flglm/distributed.py reads no distributed variable: the check reads nothing"


def test_no_line_outside_the_distributed_module_names_a_distributed_variable_beside_the_environment() -> None:
    """The grep-style twin of the test above: catches reads the ``ast`` walk would miss (``dict(os.environ)[...]``)."""
    pattern = re.compile(r"(environ|getenv).*['\"](RANK|WORLD_SIZE|LOCAL_[A-Z_]+|MASTER_[A-Z_]+)['\"]")
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "distributed.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "distributed variables read outside flglm/distributed.py:\n" + "\n".join(hits)


def test_the_env_checks_find_a_read_when_there_is_one() -> None:
    """Positive control: each way of reading is recognised."""
    source = "\n".join(
        [
            "import os",
            "a = os.environ['RANK']",
            "b = os.environ.get('WORLD_SIZE')",
            "c = os.getenv('LOCAL_RANK')",
            "d = 'MASTER_PORT' in os.environ",
            "os.environ['MASTER_ADDR'] = 'x'",  # a write, not a read
            "e = os.environ.get('HOME')",  # not a distributed variable
        ]
    )
    assert [v for _, v in _env_reads(ast.parse(source))] == ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"]


# ---------------------------------------------------------------------------------------- sizes
def test_no_module_of_the_package_is_over_the_size_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_a_server_process_imports_no_lightning_tasks_or_client_code() -> None:
    """What ``flglm train`` runs in a server process (its job, logging, the launcher) imports no
    Lightning, metrics, tasks or client code: it starts seconds sooner and holds none of it."""
    probe = (
        "import sys; import flglm.cli, flglm.jobs.logs, flglm.jobs.serve; "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('lightning', 'lightning_fabric', 'torchmetrics')} "
        "| {m for m in sys.modules if m.startswith(('flglm.tasks', 'flglm.client', 'flglm.jobs.train', 'flglm.callbacks'))}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout

