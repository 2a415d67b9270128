"""docs/architecture.md and the code agree where later work could let them drift apart.

Read from the source (``ast``), nothing imported: every ``TollwayError`` subclass is drawn in the
document's exception tree and named in ``core/errors.py``; no module outside ``tollway.redis``
handles redis-py's exceptions itself (the Redis boundary, ``tollway.redis.errors``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "tollway"
REDIS_PACKAGE = SRC / "redis"
_EXCEPTION = ("Error", "Exception")


@functools.cache
def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(SRC.rglob("*.py"))}


def _tollway_errors() -> dict[str, str]:
    """Every subclass of TollwayError defined in tollway: class name → its module's path."""
    bases: dict[str, tuple[set[str], str]] = {}
    for path, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                bases[node.name] = (names, str(path.relative_to(SRC)))
    found = {"TollwayError"}
    grew = True
    while grew:
        grew = False
        for name, (parents, _) in bases.items():
            if name not in found and parents & found:
                found.add(name)
                grew = True
    return {name: bases[name][1] for name in sorted(found)}


def test_every_tollway_error_is_in_the_drawn_exception_tree() -> None:
    """A new TollwayError subclass joins docs/architecture.md's tree and core/errors.py's list."""
    errors = _tollway_errors()
    assert len(errors) > 20, errors  # the walk found the tree
    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc[doc.index("## Exceptions") : doc.index("Outside the tree")]
    branches = [line.lstrip("│ ") for line in tree.splitlines()]
    drawn = {line.split()[1] for line in branches if line.startswith(("├── ", "└── "))}
    assert set(errors) - drawn - {"TollwayError"} == set(), "not drawn in docs/architecture.md"
    listed = ast.get_docstring(ast.parse((SRC / "core" / "errors.py").read_text())) or ""
    assert {name for name in errors if f"``{name}``" not in listed and f" {name} " not in listed} == set()


def _handles_redis_exceptions(tree: ast.Module) -> list[str]:
    """Where a module imports redis-py's exception classes or names one (``redis.exceptions.X``, ``aioredis.X``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("redis.exceptions")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("redis"):
            module = node.module or ""
            found += [
                f"from {module} import {a.name}"
                for a in node.names
                if module.startswith("redis.exceptions") or a.name == "exceptions" or a.name.endswith(_EXCEPTION)
            ]
        elif isinstance(node, ast.Attribute):
            text = ast.unparse(node)
            if text.startswith(("redis.exceptions", "aioredis.")) and text.endswith((*_EXCEPTION, "exceptions")):
                found.append(text)
    return found


def test_only_the_redis_package_handles_redis_py_exceptions() -> None:
    """Outside tollway.redis, Redis fails as RedisDown or RedisRefused (``UNAVAILABLE``), never as redis-py's."""
    offenders = {
        str(path.relative_to(SRC)): found
        for path, tree in _modules().items()
        if REDIS_PACKAGE not in path.parents and (found := _handles_redis_exceptions(tree))
    }
    assert offenders == {}


def test_the_check_sees_redis_py_exceptions() -> None:
    """The check above is not vacuous: it finds the ways a module could name redis-py's exceptions."""
    for source in (
        "import redis.exceptions",
        "from redis.exceptions import ResponseError",
        "from redis import RedisError",
        "try:\n    pass\nexcept redis.exceptions.ConnectionError:\n    pass",
        "try:\n    pass\nexcept aioredis.RedisError:\n    pass",
    ):
        assert _handles_redis_exceptions(ast.parse(source)), source
    assert _handles_redis_exceptions(ast.parse((REDIS_PACKAGE / "errors.py").read_text()))
