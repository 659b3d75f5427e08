"""The package layout's one rule: imports run one way (docs/README.md "Layout"). Each package of vincie/ and
data_index/ sits on a layer and imports only from its own package and from lower layers; data and model, on one
layer, do not import each other. Checked on every import statement, those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = [  # bottom first
    {"vincie.errors", "vincie.gpus"},
    {"vincie.config"},
    {"vincie.storage", "vincie.chat", "vincie.progress"},
    {"vincie.sessions"},
    {"vincie.data", "vincie.model"},
    {"vincie.training", "data_index.synthetic", "data_index.ingest", "data_index.precompute", "data_index.show"},
    {"vincie.inference"},
    {"vincie.evaluation"},
    {"vincie.ops"},
    {"data_index.cli"},
    {"vincie.cli"},
    {"vincie.__main__"},
]


def unit(module: str) -> str | None:
    """The layer unit a module belongs to: the longest LAYERS name that is the module or a package above it."""
    names = [n for layer in LAYERS for n in layer if module == n or module.startswith(n + ".")]
    return max(names, key=len) if names else None


def layer(name: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if name in units)


def imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("vincie", "data_index")}


def modules():
    for package in ("vincie", "data_index"):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_has_a_layer():
    assert [m for _, m in modules() if m not in ("vincie", "data_index") and unit(m) is None] == []


def test_imports_run_one_way():
    wrong = []
    for path, module in modules():
        here = unit(module)
        if here is None:
            continue
        for target in imports(path, module):
            there = unit(target)
            if there is None or there == here:
                continue
            if layer(there) >= layer(here):
                wrong.append(f"{module} imports {target} ({here} is on layer {layer(here)}, {there} on {layer(there)})")
    assert wrong == []
