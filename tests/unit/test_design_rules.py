"""The design rules test themselves: ``docs/design.md`` ("The rules") lists them once, in a block this test
reads, and the package's own imports (read with ``ast``, function-level and ``TYPE_CHECKING`` ones too) must
keep every one; so must the sizes (a module is read whole, a function at a glance).

The block's lines (``#`` starts a comment)::

    layer N: UNIT ...                 bottom up: a unit imports only units of lower layers (and itself)
    only PLACE: PLACE ...             PLACE imports nothing of the package but these
    never PLACE: PLACE ...            PLACE imports none of these
    at import time never: NAME ...    no module imports these outside a function (they load when used)
    import prefetch never loads: NAME ...   nor does any module ``import prefetch`` imports
    at most lines: module N function N

A UNIT is a top-level module (``loader``) or a package (``core/``); a PLACE is a unit or a module in a
package (``core/structure``, ``processes/run``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import prefetch

# The checkout's package and docs (tox installs the package elsewhere, without docs/), else the imported one's.
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "prefetch" if (ROOT / "prefetch" / "__init__.py").exists() else Path(prefetch.__file__).parent
DESIGN = ROOT / "docs" / "design.md"


# --- the package as its imports say ------------------------------------------------------------------------


@dataclass
class Module:
    name: str  # "loader", "core/structure", "processes/__init__"
    lines: int
    imports: set[str] = field(default_factory=set)  # modules of the package, wherever the import stands
    at_import: set[str] = field(default_factory=set)  # ... those run when the module is imported
    outside_at_import: set[str] = field(default_factory=set)  # top-level names of other distributions, likewise
    functions: dict[str, int] = field(default_factory=dict)  # qualified name -> lines

    @property
    def unit(self) -> str:
        head, _, rest = self.name.partition("/")
        return f"{head}/" if rest else head


def _module_name(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def _module_at(parts: list[str]) -> str | None:
    """The module of the package that ``parts`` (``["core", "config"]``) names, if any."""
    path = "/".join(parts)
    if parts and (PACKAGE / f"{path}.py").exists():
        return path
    init = f"{path}/__init__" if parts else "__init__"
    return init if (PACKAGE / f"{init}.py").exists() else None


def _targets(base: list[str], names: list[str]) -> list[str]:
    """The modules ``from <base> import <names>`` loads: a name that is a module of its own, else ``base``."""
    found = [_module_at([*base, name]) or _module_at(base) for name in names] if names else [_module_at(base)]
    return [target for target in found if target is not None]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _walk(node: ast.AST, at_import: bool, visit) -> None:
    """Visit every import below ``node``, telling whether it runs when the module is imported."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            visit(child, at_import)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
            isinstance(child, ast.If) and _is_type_checking(child)
        ):
            _walk(child, False, visit)
        else:
            _walk(child, at_import, visit)


def _read(path: Path) -> Module:
    source = path.read_text()
    tree = ast.parse(source)
    module = Module(_module_name(path), len(source.splitlines()))

    def visit(node: ast.Import | ast.ImportFrom, at_import: bool) -> None:
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            package = module.name.split("/")[:-1]  # "processes/run" and "processes/__init__": ["processes"]
            base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            targets = _targets(base, [alias.name for alias in node.names])
        else:
            from_names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            for dotted in [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]:
                top, _, rest = (dotted or "").partition(".")
                if top == "prefetch":
                    targets += _targets(rest.split(".") if rest else [], from_names)
                elif at_import:
                    module.outside_at_import.add(top)
        module.imports.update(targets)
        if at_import:
            module.at_import.update(targets)

    _walk(tree, True, visit)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    module.functions[f"{node.name}.{item.name}"] = item.end_lineno - item.lineno + 1
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            module.functions.setdefault(node.name, node.end_lineno - node.lineno + 1)
    return module


MODULES = {module.name: module for module in map(_read, sorted(PACKAGE.rglob("*.py")))}


def _at(place: str, name: str) -> bool:
    """Whether module ``name`` is at ``place``: a unit (``core/``, ``loader``) or a module (``processes/run``)."""
    return name.startswith(place) if place.endswith("/") else name == place or name == f"{place}/__init__"


# --- the rules, as design.md writes them -------------------------------------------------------------------


def _rules() -> list[tuple[str, str, list[str]]]:
    """``(kind, subject, objects)`` for each line of the rules block in design.md: ``layer 3: ipc/ stats``
    is ``("layer", "3", ["ipc/", "stats"])``, ``at import time never: ray`` is ``("at import time never",
    "", ["ray"])``."""
    block = re.search(r"<!-- design rules -->\s*```text\n(.*?)```", DESIGN.read_text(), re.S)
    assert block, "docs/design.md has no rules block (<!-- design rules --> and a ```text block)"
    rules = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            head, _, objects = line.partition(":")
            kind, _, subject = head.partition(" ")
            if kind not in ("layer", "only", "never") or head == "never":
                kind, subject = head.strip(), ""
            rules.append((kind, subject.strip(), objects.split()))
    return rules


RULES = _rules()
LAYERS = {unit: int(subject) for kind, subject, units in RULES if kind == "layer" for unit in units}


def _rule_id(rule: tuple[str, str, list[str]]) -> str:
    return f"{rule[0]} {rule[1]}".strip()


def test_the_rules_block_is_read_and_every_module_has_a_layer():
    assert {kind for kind, _, _ in RULES} >= {"layer", "only", "never", "at import time never"}
    missing = sorted({m.unit for m in MODULES.values()} - set(LAYERS))
    assert not missing, f"modules with no layer in docs/design.md's rules block: {missing}"


def test_imports_only_go_down_the_layers():
    broken = [
        f"{m.name} (layer {LAYERS[m.unit]}) imports {target} (layer {LAYERS[MODULES[target].unit]})"
        for m in MODULES.values()
        for target in sorted(m.imports)
        if MODULES[target].unit != m.unit and LAYERS[MODULES[target].unit] >= LAYERS[m.unit]
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("rule", [r for r in RULES if r[0] in ("only", "never")], ids=_rule_id)
def test_a_place_imports_only_what_it_may(rule):
    kind, place, objects = rule
    broken = []
    for m in MODULES.values():
        if not _at(place, m.name):
            continue
        for target in sorted(m.imports):
            allowed = any(_at(o, target) for o in objects) or (kind == "only" and _at(place, target))
            if (kind == "only" and not allowed) or (kind == "never" and any(_at(o, target) for o in objects)):
                broken.append(f"{m.name} imports {target}")
    assert not broken, f"{kind} {place}: {', '.join(objects)}\n" + "\n".join(broken)


def test_heavy_or_optional_libraries_load_only_when_used():
    never = {name for kind, _, names in RULES if kind == "at import time never" for name in names}
    broken = [
        f"{m.name} imports {sorted(m.outside_at_import & never)}"
        for m in MODULES.values()
        if m.outside_at_import & never
    ]
    assert not broken, "\n".join(broken)


def test_import_prefetch_loads_only_what_it_needs():
    never = {name for kind, _, names in RULES if kind == "import prefetch never loads" for name in names}
    loaded, pending = set(), ["__init__"]
    while pending:
        name = pending.pop()
        if name in loaded:
            continue
        loaded.add(name)
        parent = name.rsplit("/", 1)[0] if "/" in name else None
        if parent is not None and f"{parent}/__init__" in MODULES:
            pending.append(f"{parent}/__init__")  # importing a submodule runs its package's __init__
        pending.extend(MODULES[name].at_import)
    broken = [f"{name} imports {sorted(MODULES[name].outside_at_import & never)}" for name in sorted(loaded)]
    assert not [b for b in broken if not b.endswith("[]")], "\n".join(broken)


def test_modules_and_functions_are_small_enough_to_read():
    (sizes,) = [objects for kind, _, objects in RULES if kind == "at most lines"]
    limits = dict(zip(sizes[::2], map(int, sizes[1::2]), strict=True))
    long = [f"{m.name}: {m.lines} lines" for m in MODULES.values() if m.lines > limits["module"]]
    long += [
        f"{m.name}.{f}: {n} lines" for m in MODULES.values() for f, n in m.functions.items() if n > limits["function"]
    ]
    assert not long, "\n".join(long)
