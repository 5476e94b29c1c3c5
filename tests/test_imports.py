"""chexcy's modules import one another one way (DESIGN.md, Layout): data -> ops -> nn -> scoring -> train ->
evaluate -> cli. Read from the source with `ast`, counting imports inside functions too (a function-local
import hides a cycle from Python's import machinery until the day the function runs first)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "chexcy"

# The layers, lowest first. A module may import modules of its own layer or lower ones, never higher ones.
# Within a layer the graph must still be free of cycles.
LAYERS = [
    ("base", ["chexcy", "chexcy._args", "chexcy.cpus", "chexcy.fileio", "chexcy.locks", "chexcy.seeding", "chexcy.memory", "chexcy._native", "chexcy.comm",
              "chexcy.metrics"]),
    ("data", ["chexcy.data"]),
    ("ops", ["chexcy.ops", "chexcy._fallback", "chexcy.reference"]),
    ("nn", ["chexcy.nn", "chexcy.optim", "chexcy.parallel", "chexcy.checkpoint", "chexcy.weights"]),
    ("scoring", ["chexcy.scoring"]),
    ("train", ["chexcy.runlog", "chexcy.runfolder", "chexcy.train", "chexcy.distributed"]),
    ("evaluate", ["chexcy.evaluate", "chexcy.predict", "chexcy.onnx_export", "chexcy.demo", "chexcy.info"]),
    ("cli", ["chexcy.commands", "chexcy.data.commands", "chexcy.cli", "chexcy.__main__"]),
]


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name, known):
    """The chexcy module an imported dotted name refers to (the longest known prefix), or None."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph():
    """{module: {chexcy modules it imports anywhere in its source}}."""
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                if target.split(".")[0] != "chexcy":
                    continue
                found = resolve(target, known)
                if found is not None and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(name):
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or (prefix != "chexcy" and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # chexcy.commands imports chexcy.train only inside run_train: the graph must still hold the edge.
    assert "chexcy.train" in graph["chexcy.commands"], graph["chexcy.commands"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_chexcy_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    missing = [name for name in modules() if layer_of(name) is None]
    assert not missing, f"modules without a layer in tests/test_imports.py LAYERS: {missing}"


def test_imports_run_one_way_through_the_layers():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_class_assignment_in_chexcy():
    # Layers own their math: no module swaps an object's class behind its back (a synchronised BatchNorm
    # is BatchNorm2d given a communicator).
    offenders = [f"{name}:{node.lineno}" for name, path in modules().items()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Attribute) and target.attr == "__class__"]
    assert not offenders, offenders


def test_the_training_loop_reads_in_one_screen():
    # fit and its steps (start_or_resume, train_epoch, end_epoch) each fit on a screen.
    tree = ast.parse((PACKAGE / "train.py").read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {"fit", "start_or_resume", "train_epoch", "end_epoch"} <= set(lengths)
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] < 100, f"{longest} in chexcy/train.py has {lengths[longest]} lines"
