"""The module graph is a tree (README, "Layout"): commands on top, nothing imports a command, and
no lower module imports a higher one."""
import ast

from conftest import ROOT

# Each module and the modules it may import; a module missing here is a new file to place.
ALLOWED = {
    "ops": set(),
    "msda": {"ops"},
    "config": set(),
    "flops": set(),
    "visualize": set(),
    "encoders": {"msda", "ops"},
    "postprocess": {"ops"},
    "model": {"encoders", "msda", "ops", "config", "postprocess"},
    "data": {"config"},
    "synthetic": {"config", "data", "visualize"},
    "metrics": {"config", "data", "encoders", "flops", "model", "msda", "visualize"},
    "gate": {"config", "data", "encoders", "model", "msda"},
    "train": {"config", "data", "encoders", "metrics", "model", "flops", "msda"},
    "derive": {"config", "data", "encoders", "metrics", "model", "flops", "msda"},
    "predict": {"config", "data", "encoders", "metrics", "visualize"},
    "report": {"config", "data", "gate", "metrics", "model", "visualize"},
    "evaluate": {"config", "data", "encoders", "flops", "gate", "metrics", "model", "msda", "predict", "report",
                 "visualize"},
}


def local_imports(path, modules):
    """Every module of `modules` that the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules


def test_every_module_imports_only_modules_below_it():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == set(ALLOWED), "a module was added or removed: place it in ALLOWED and the README"
    for name in sorted(modules):
        wrong = local_imports(ROOT / f"{name}.py", modules) - ALLOWED[name]
        assert not wrong, f"{name}.py imports {sorted(wrong)}"


def test_no_module_over_800_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ROOT.glob("*.py")}
    assert max(sizes.values()) <= 800, sizes
