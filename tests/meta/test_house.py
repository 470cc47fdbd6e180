"""The package's structure: no import circles (every import statement counts, the ones inside
functions too), a small ground floor, one name per module, the engine's modules reading no private
attribute of another module's object, and docs/architecture.md naming only modules that exist."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "datadam_fast"
# kernels/ is installed as datadam_fast.kernels (setup.py package_dir)
TREES = ((PKG, "datadam_fast"), (ROOT / "kernels", "datadam_fast.kernels"))
GROUND_FLOOR = {"__init__.py", "__main__.py", "errors.py", "_constants.py", "_io.py", "devices.py", "profiling.py"}


def _modules():
    out = {}
    for base, pkg in TREES:
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = path
    return out


def import_graph():
    """``{module: {module it imports}}`` from every ``import`` / ``from ... import`` statement."""
    mods = _modules()
    graph = {m: set() for m in mods}

    def owner(name):  # the longest prefix of ``name`` that is a module of the package
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[mod].update(filter(None, (owner(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("datadam_fast"):
                    continue
                for a in node.names:  # ``from pkg import submodule`` imports the submodule
                    sub = f"{target}.{a.name}"
                    graph[mod].add(sub if sub in mods else owner(target))
        graph[mod].discard(mod)
        graph[mod].discard("")
    return graph


def find_cycle(graph):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "datadam_fast.loss.backends.base" in graph["datadam_fast.loss.backends.cpu"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_engine_never_imports_the_cli():
    graph = import_graph()
    for mod, deps in graph.items():
        if not mod.startswith("datadam_fast.cli") and mod != "datadam_fast.__main__":  # python -m datadam_fast
            assert not any(d.startswith("datadam_fast.cli") for d in deps), (mod, sorted(deps))


def test_the_cycle_finder_finds_a_lazy_import_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_ground_floor_is_at_the_top_level():
    top = {p.name for p in PKG.glob("*.py")}
    assert len(top) <= 7 and top <= GROUND_FLOOR, sorted(top - GROUND_FLOOR)
    assert not (PKG / "_compat.py").exists()


def test_docs_and_tests_use_only_real_module_paths():
    r = subprocess.run(["grep", "-rnE", r"datadam_fast\.(networks|real_side|augment|compiled)\b",
                        "README.md", "docs", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    this = Path(__file__).relative_to(ROOT).as_posix()
    hits = [line for line in r.stdout.splitlines() if not line.startswith(this)]
    assert not hits, "\n".join(hits)


ENGINE = ("step.py", "planner.py", "rundir.py", "loop.py")


def private_reads(path: Path):
    """``obj._name`` reads in ``path`` where ``obj`` is not ``self`` / ``cls`` (dunders allowed)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            out.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return out


def test_the_engine_reads_no_private_attribute_of_another_object():
    hits = [h for name in ENGINE for h in private_reads(PKG / "distill" / name)]
    assert not hits, "\n".join(hits)


def test_the_private_read_finder_sees_one(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f(d):\n    return d._next_real_idx, d.state, self_like._x\n")
    assert private_reads(p) == ["m.py:2: ._next_real_idx", "m.py:2: ._x"]


def test_the_real_side_path_is_chosen_once_per_run():
    """Nothing in the step re-derives the path from the fused implementation: it reads the run's RealSide."""
    src = (PKG / "distill" / "step.py").read_text()
    assert "fused_real ==" not in src and not re.search(r"\bd\.fused_real\b", src)
    from datadam_fast.distill.step import RealSide
    side = RealSide("cpu")
    side.compiled = True
    assert side.path == "fused"  # the C++ epilogue replaces the compiled real pass
    side.fused_failed()
    assert side.path == "compiled"
    side.compile_failed()
    assert side.path == "eager"
    triton = RealSide("triton", compiled=True)
    assert triton.path == "compiled" and triton.path_without_compiled() == "fused"


def test_architecture_doc_names_only_modules_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = set(re.findall(r"`((?:datadam_fast|kernels|csrc|benchmarks|tests)/[\w/.-]+\.(?:py|cpp|cu|cuh|sh))`", text))
    assert len(names) >= 20, f"docs/architecture.md names only {len(names)} files"
    missing = sorted(n for n in names if not (ROOT / n).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    wings = [d.name for d in PKG.iterdir() if d.is_dir() and (d / "__init__.py").exists()]
    for wing in wings:
        assert f"datadam_fast/{wing}/" in text, f"docs/architecture.md does not show the {wing}/ wing"
