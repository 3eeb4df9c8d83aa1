"""Which first-party packages may import which (DESIGN.md's one direction of imports, and the
package boundaries below it), read from the source so a lazy import inside a function counts."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """{module path: the absolute module names it imports} for every file under `package`."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# (package, what it must not import, why)
RULES = [
    (
        "fpsa_jax/attention",
        lambda n: _within(n, "fpsa_jax") and not _within(n, "fpsa_jax.attention"),
        "the operator stands alone",
    ),
    ("fpsa_jax", lambda n: _within(n, "train") or _within(n, "infer"), "the library is below apps"),
    ("fpsa_jax/data", lambda n: _within(n, "fpsa_jax.pipeline"), "data is below the pipeline"),
]


@pytest.mark.parametrize("package, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_a_package_imports_nothing_above_or_beside_it(package, forbidden, why):
    offenders = {
        path: sorted(n for n in names if forbidden(n))
        for path, names in _imports(package).items()
        if any(forbidden(n) for n in names)
    }
    assert offenders == {}, why
