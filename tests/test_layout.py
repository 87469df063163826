"""The shape of the package: imports point down the data's path, rooms stay small.

cli -> lab -> io -> linearization -> core -> _checks. A module may import from its own floor
or any floor below, never above, so the method never depends on an experiment or a file
format, and the core can be read (and tested) alone.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "koopnet"

# floor of each module, by its dotted name below koopnet (a package maps its whole folder)
FLOORS = {"_checks": 0, "_version": 0, "linearization": 2, "depth": 2, "io": 3, "lab": 4,
          "cli": 5, "__init__": 6, "__main__": 6}
CORE = 1  # every other top-level module: models, scaling, trajectories, observables, dmd, ...
MAX_LINES = 400


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _floor(dotted: str) -> int:
    top = dotted.split(".")[0]
    return FLOORS.get(top, CORE)


def _name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, koopnet submodule) of every import, module-level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "koopnet":
                found += [(node.lineno, alias.name) for alias in node.names]
            elif node.module.startswith("koopnet."):
                found.append((node.lineno, node.module.removeprefix("koopnet.")))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.removeprefix("koopnet."))
                      for alias in node.names if alias.name.startswith("koopnet.")]
    return found


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_imports_point_down(path):
    here = _name(path)
    upward = [f"line {line}: {target}" for line, target in _imports(path)
              if _floor(target) > _floor(here)]
    assert not upward, f"koopnet.{here} imports from a higher floor: {upward}"


def test_the_floors_are_real():
    """The check above can fail: an upward import is seen as one."""
    assert _floor("lab.protocols") > _floor("io.artifacts") > _floor("linearization")
    assert _floor("linearization") > _floor("dmd") > _floor("_checks")
    sample = ROOT / "cli" / "main.py"
    assert any(_floor(t) > _floor("io") for _, t in _imports(sample))


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"koopnet.{_name(path)} has {lines} lines (> {MAX_LINES})"


def _code_lines(node: ast.FunctionDef) -> int:
    """Lines of a function without its docstring (numpydoc docstrings are long on purpose)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_functions_stay_short(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{n.name} ({_code_lines(n)} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(n) > 60]
    assert not long, f"koopnet.{_name(path)}: functions over 60 lines of code: {long}"
