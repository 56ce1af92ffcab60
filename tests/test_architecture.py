"""The package map of docs/architecture.md, checked from the source: imports point down, no cycles.

Every import counts, a lazy one inside a function included: it is as much a dependency as one at the
top of a file, only paid later. The graph is read with `ast` (nothing is imported), so the test is
instant and names the file and line of an edge that breaks the layout.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llama3_jax"

# Ground floor first. A module may import its own room and any room on a lower floor, nothing else.
FLOORS = [
    ("parallel", "tokenizer", "failpoints", "config_loader"),  # meshes/processes; leaf helpers
    ("model",),                                                # the network, its caches, LoRA, int8
    ("store",),                                                # checkpoints, manifests, buckets
    ("data", "convert"),                                       # input pipeline, formats
    ("serve",),                                                # decoding (reads any format convert reads)
    ("train",),                                                # the loop, the step, objectives
    ("cli",),                                                  # one file per command
    ("__init__",),                                             # the lazy public API
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every llama3_jax import, resolved to the module it loads."""
    def longest(name):
        parts = name.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return ".".join(parts)

    edges = []
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base] + subs
            else:
                continue
            for t in targets:
                if t and t.split(".")[0] == "llama3_jax" and longest(t) not in ("", name):
                    edges.append((name, longest(t), node.lineno))
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_lives_in_a_known_room():
    top = {p.name for p in PKG.iterdir() if not p.name.startswith(("_", ".")) or p.name == "__init__.py"}
    expected = {r if r == "__init__" else r for rooms in FLOORS for r in rooms}
    found = {p.removesuffix(".py") for p in top}
    assert found - {"__init__"} <= expected, f"new top-level entries {sorted(found - expected)}: give them a room"
    assert expected <= found, f"rooms without a file: {sorted(expected - found)}"


def test_imports_point_down():
    mods = modules()
    bad = []
    for a, b, line in imports(mods):
        ra, rb = room(a), room(b)
        if ra != rb and FLOOR[rb] >= FLOOR[ra]:
            bad.append(f"{mods[a].relative_to(PKG.parent)}:{line}: {ra} (floor {FLOOR[ra]}) imports {b} "
                       f"(floor {FLOOR[rb]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _ in imports(mods):
        graph[a].add(b)
    # Tarjan's strongly connected components; any with two or more modules is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The graph must catch an upward lazy import, or the two tests above could not fail."""
    mods = modules()
    edges = {(a, b) for a, b, _ in imports(mods)}
    assert ("llama3_jax.cli.generate", "llama3_jax.serve.offline") in edges  # lazy, inside a function
    assert any(a.startswith("llama3_jax.model.") and b == "llama3_jax.parallel.sharding" for a, b in edges)


# A function past this reads as several jobs: split it into named steps (docs/architecture.md). The
# count includes the signature and docstring; `make_iterator`'s 14 keyword arguments are most of its 63.
MAX_FUNCTION_LINES = 65
MAX_MODULE_LINES = 500  # past this a module becomes a package of one-job files


def test_functions_and_modules_stay_short():
    long = []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(PKG.parent)}: {text.count(chr(10))} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.name} is {n} lines "
                                f"(> {MAX_FUNCTION_LINES})")
    assert not long, "split these into named steps or one-job files:\n" + "\n".join(long)


def test_model_and_step_pieces_import_without_the_data_pipeline():
    """The GPU image has no grain and no llama-models: the model, its caches and attention, the loss and
    the optimizer (what benchmarks/gpu_bench.py builds a step from) must import without them, and so must
    serve/, which decodes without reading training data, and the train step and GRPO's host side
    (gpu_bench.py's GRPO row: data/ loads its grain iterators only when asked for them)."""
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('grain', 'llama_models', 'array_record'): sys.modules[m] = None\n"
            "import llama3_jax.model.llama, llama3_jax.model.attention, llama3_jax.model.kv_cache\n"
            "import llama3_jax.train.losses, llama3_jax.train.optim, llama3_jax.parallel.hardware\n"
            "import llama3_jax.serve.engine\n"
            "import llama3_jax.train.step, llama3_jax.train.rl\n")  # gpu_bench.py's GRPO row: the real step
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]
