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


def _offenders(package: str, forbidden) -> dict[str, list[str]]:
    return {
        path: sorted(n for n in names if forbidden(n))
        for path, names in _imports(package).items()
        if any(forbidden(n) for n in names)
    }


@pytest.mark.parametrize(
    "package, allowed",
    [
        ("fpsa_jax/attention", "fpsa_jax.attention"),  # the operator stands alone
        ("fpsa_jax", "fpsa_jax"),  # the library never imports the apps
    ],
)
def test_a_package_imports_no_first_party_module_outside_its_allowance(package, allowed):
    first_party = ("fpsa_jax", "train", "infer")

    def forbidden(name):
        top = name.split(".")[0]
        return top in first_party and not (name == allowed or name.startswith(allowed + "."))

    assert _offenders(package, forbidden) == {}
