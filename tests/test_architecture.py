"""The layering of docs/architecture.md, read from the source with ``ast``: a module imports only
from its own package and from the layers below it, and src/ has no import circle."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: (module or package, layer): a module's layer is that of its longest listed prefix.
#: Keep in step with the table in docs/architecture.md.
LAYERS = {
    "mixlab.fileio": 0, "mixlab.version": 0, "mixlab.registry": 0,
    "mixlab.layers": 1,
    "mixlab.mixers": 2,
    "mixlab.models": 3,
    "mixlab.weights": 4,
    "mixlab.factory": 5,
    "mixlab.data": 6, "mixlab.config": 6, "mixlab.analysis.complexity": 6,
    "mixlab.engine": 7,
    "mixlab.runs": 8,
    "mixlab.analysis": 9, "mixlab.arena": 9, "mixlab.predict": 9,
    "mixlab.cli": 10, "mixlab.__main__": 10, "mixlab": 10,
}
#: the command line and the package itself may import anything
TOP = 10
#: the analysis package's __init__ only gathers its measuring functions (layer 6), which the
#: engine uses; its other modules are layer 9
EXACT = {"mixlab.analysis": 6}


def module_names(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``src``."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported mixlab module, line)`` for every import in the file, function bodies included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found += [(t, node.lineno) for t in subs] or [(target, node.lineno)]
    return [(t, line) for t, line in found if t == "mixlab" or t.startswith("mixlab.")]


def layer_of(module: str) -> tuple[int, str]:
    """``(layer, group)``: the group is the listed prefix that decided it."""
    if module in EXACT:
        return EXACT[module], module
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix], prefix
    raise KeyError(module)


def violations(src: Path) -> list[str]:
    """Every import that runs against the layering, as ``file:line: a (layer) imports b (layer)``."""
    mods = module_names(src)
    bad = []
    for name, path in mods.items():
        lay, group = layer_of(name)
        for target, line in imports_of(name, path, set(mods)):
            if target not in mods:
                bad.append(f"{path.relative_to(src)}:{line}: {name} imports {target}, which does not exist")
                continue
            tlay, tgroup = layer_of(target)
            same_package = tgroup == group or target.startswith(group + ".") or \
                (group.startswith(tgroup + ".") and target in EXACT)
            if not same_package and tlay >= lay and lay < TOP:
                bad.append(f"{path.relative_to(src)}:{line}: {name} (layer {lay}) imports {target} (layer {tlay})")
    return bad


def import_cycles(src: Path) -> list[list[str]]:
    """The strongly connected components (more than one module) of the import graph (Tarjan)."""
    mods = module_names(src)
    graph = {m: sorted({t for t, _ in imports_of(m, p, set(mods)) if t in mods and t != m}) for m, p in mods.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in module_names(SRC):
        layer_of(name)  # raises KeyError for a module no prefix covers


def test_imports_follow_the_layering():
    bad = violations(SRC)
    assert not bad, "imports against docs/architecture.md's layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycles = import_cycles(SRC)
    assert not cycles, f"import circles in src/: {cycles}"


@pytest.mark.parametrize("where, line", [
    ("mixlab/layers/norm.py", "from ..models.base import MixlabModel"),  # a part reaching up to models
    ("mixlab/registry.py", "from .factory import create_model"),  # the leaf importing the factory
    ("mixlab/engine/optim.py", "from ..runs import load_run_model  # noqa"),  # engine reaching up, lazily
    ("mixlab/analysis/erf.py", "from ..arena import runner"),  # two packages of one layer
])
def test_a_planted_wrong_import_is_caught(tmp_path, where, line):
    shutil.copytree(SRC / "mixlab", tmp_path / "mixlab")
    target = tmp_path / where
    body = target.read_text()
    target.write_text(body + "\n\ndef _planted():\n    " + line + "\n")
    new = sorted(set(violations(tmp_path)) - set(violations(SRC)))
    assert len(new) == 1 and new[0].startswith(where), new


def test_a_planted_cycle_is_caught(tmp_path):
    shutil.copytree(SRC / "mixlab", tmp_path / "mixlab")
    (tmp_path / "mixlab" / "layers" / "a_.py").write_text("from . import b_\n")
    (tmp_path / "mixlab" / "layers" / "b_.py").write_text("from . import a_\n")
    assert ["mixlab.layers.a_", "mixlab.layers.b_"] in import_cycles(tmp_path)


#: the model modules every family may use, and the families built on another family
SHARED_MODELS = {"mixlab.models", "mixlab.models.base", "mixlab.models.blocks", "mixlab.models.spec",
                 "mixlab.models.nano"}
BUILT_ON = {"mixlab.models.vit_c": {"mixlab.models.vit"},  # ViT with a convolutional stem: a subclass
            "mixlab.models.botnet": {"mixlab.models.resnet"},  # ResNet-50 with attention in its last stage
            "mixlab.models.spec": {"mixlab.models.convnext", "mixlab.models.resnet"}}  # their blocks as stage types


def test_no_family_imports_another():
    mods = module_names(SRC)
    bad = []
    for name, path in mods.items():
        if not name.startswith("mixlab.models."):
            continue
        for target, line in imports_of(name, path, set(mods)):
            if target.startswith("mixlab.models.") and target not in SHARED_MODELS | BUILT_ON.get(name, set()) \
                    and target != name:
                bad.append(f"{path.relative_to(SRC)}:{line}: {name} imports {target}")
    assert not bad, "a family file imports another family's (move the shared part to layers/ or mixers/):\n" \
        + "\n".join(bad)


def test_mixers_live_in_mixers():
    """Every spatial mixer (a subclass of ``Mixer``) is defined in ``mixlab.mixers``, none in a model file."""
    import importlib
    import inspect

    from mixlab.mixers.base import Mixer

    misplaced = []
    for name in module_names(SRC):
        if name.startswith("mixlab.models."):
            module = importlib.import_module(name)
            misplaced += [f"{name}.{n}" for n, obj in vars(module).items() if inspect.isclass(obj)
                          and issubclass(obj, Mixer) and obj.__module__ == name]
    assert not misplaced, f"mixers defined outside mixlab.mixers: {misplaced}"
