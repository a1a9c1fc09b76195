"""The layers of docs/architecture.md: nothing imports upward.

L0 math core and the table of parts (torch and the standard library only) < L1 models, data,
explain, plots, config < L2 training, runs, evaluation, checkpoint, distributed, inspection
< L3 report, web < L4 cli.
"""

import ast
from pathlib import Path

import vaelab

PACKAGE = Path(vaelab.__file__).parent
LAYERS = {
    0: {
        "kl",
        "distributions",
        "contract",  # the model contract's types (no estimator): what models/ builds on
        "objectives",
        "linear_gaussian",
        "errors",
        "fileio",
        "parts",
        "decomposition",
        "memory",
        "distributed",  # torch.distributed only: models that sum over processes (a VQ codebook, M2) use it
    },
    1: {"models", "data", "explain", "plots", "config", "rundir", "bitsback"},
    2: {"training", "runs", "evaluation", "gaps", "checkpoint", "inspection"},
    3: {"report", "web", "compress", "sweep", "rd"},
    4: {"cli", "__main__", "__init__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
L0_MAY_IMPORT = {
    "torch",
    "json",
    "resource",
    "math",
    "dataclasses",
    "typing",
    "__future__",
    "os",
    "errno",
    "tempfile",
    "contextlib",
    "pathlib",
    "importlib",
    "collections",
}


def top_module(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "vaelab":
                found |= {f"vaelab.{a.name}" for a in node.names}
    return found


def test_every_module_has_a_layer():
    missing = {top_module(p) for p in PACKAGE.rglob("*.py")} - set(LAYER_OF)
    assert not missing, f"add these modules to a layer in docs/architecture.md and here: {missing}"


def test_nothing_imports_upward():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        own = LAYER_OF[top_module(path)]
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "vaelab" and len(parts) > 1 and parts[1] in LAYER_OF and LAYER_OF[parts[1]] > own:
                violations.append(f"{path.relative_to(PACKAGE)} (L{own}) imports {name} (L{LAYER_OF[parts[1]]})")
            if own == 0 and parts[0] not in L0_MAY_IMPORT | {"vaelab"}:
                violations.append(f"{path.relative_to(PACKAGE)} is L0 (torch only) but imports {name}")
    assert not violations, "\n".join(violations)


def test_models_build_on_the_contract_not_on_the_estimators():
    """models/ imports the contract's types (contract.py), never the objectives' estimators."""
    users = [p.name for p in (PACKAGE / "models").glob("*.py") if "vaelab.objectives" in imports_of(p)]
    assert not users, f"models that import vaelab.objectives: {users}"


def test_cli_imports_nothing_heavy_at_start_up():
    heavy = {"torch", "numpy", "matplotlib", "sklearn"}
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
            if node.module.startswith("vaelab."):
                top_level |= imports_of(PACKAGE / (node.module.split(".")[1] + ".py")) & heavy
    assert not top_level & heavy
