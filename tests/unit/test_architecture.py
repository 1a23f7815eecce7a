"""Structural rules of the package, checked on its source: no import cycle among mlcil modules,
short functions, a small session loop, generic engine contracts, no reaching into private
members of other modules."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "mlcil"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed at run time)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """module -> mlcil modules it imports anywhere (functions included, TYPE_CHECKING not)."""
    trees = modules()
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in trees else node.module
                    for a in node.names
                ]
            graph[name].update(t for t in targets if t in trees and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_mlcil_modules() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "mlcil.config.loading" in graph
    assert "mlcil.engine.inputs" in graph["mlcil.engine.loop"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_config_imports_no_method_and_no_network() -> None:
    graph = import_graph()
    for name in ("mlcil.config", "mlcil.config.schema", "mlcil.config.loading"):
        assert not {t for t in graph[name] if t.startswith(("mlcil.methods", "mlcil.models"))}


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code in a function: blank lines, comments and docstrings not counted."""
    skip: set[int] = set()
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    count = 0
    for number in range(function.lineno, (function.end_lineno or function.lineno) + 1):
        text = source[number - 1].strip()
        if number not in skip and text and not text.startswith("#"):
            count += 1
    return count


def test_code_lines_counts_what_it_should() -> None:
    tree = ast.parse('def f():\n    """Doc\n    more."""\n    # note\n\n    x = 1\n    return x\n')
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    assert code_lines(function, ["def f():", '    """Doc', '    more."""', "    # note", "",
                                 "    x = 1", "    return x"]) == 3  # fmt: skip


def test_no_function_is_longer_than_60_lines_of_code() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = code_lines(node, source)
                if lines > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_the_session_loop_is_small() -> None:
    assert len((PACKAGE / "engine" / "loop.py").read_text().splitlines()) < 250


def test_engine_contracts_name_no_method() -> None:
    pattern = re.compile(r"dpl|pseudo|podnet", re.IGNORECASE)
    files = [*sorted((PACKAGE / "engine").glob("*.py")), PACKAGE / "models" / "base.py"]
    hits = [f"{p.name}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]  # fmt: skip
    assert not hits, hits


def test_no_module_reaches_into_another_objects_private_members() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlcil"):
                private = [a.name for a in node.names if re.match(r"_[^_]", a.name)]
                offenders.extend(f"{path.relative_to(SRC)}: imports {n}" for n in private)
    assert not offenders, offenders


FEATURES = ("pretrain", "added_sessions", "diagnostics", "api", "predict", "cli", "runs", "compare",
            "report")  # fmt: skip


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def is_feature(module: str) -> bool:
    """A feature's module, or a module of a feature that is a package (``mlcil.report.html``)."""
    return any(
        module == f"mlcil.{name}" or module.startswith(f"mlcil.{name}.") for name in FEATURES
    )


def test_the_engine_imports_no_feature_built_on_it() -> None:
    graph = import_graph()
    engine = [name for name in graph if name.startswith("mlcil.engine")]
    assert "mlcil.engine.loop" in engine and "mlcil.engine.callbacks" in engine
    assert is_feature("mlcil.report.html") and not is_feature("mlcil.results")
    # Directly or through any other module (experiment, methods, ...).
    leaks = {name: sorted(filter(is_feature, reachable(graph, name))) for name in engine}
    assert not any(leaks.values()), leaks
    assert "mlcil.runs" in reachable(graph, "mlcil.cli")  # the check sees real edges


def string_literals(path: Path) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


RUN_FOLDER_OWNER = ("rundir.py", "run_layout.py", "run_overwrite.py")  # mlcil.rundir and its parts


def test_the_run_folder_layout_is_spelled_out_only_by_its_owner() -> None:
    layout = {"config.yaml", "metrics.json", "metrics.csv", "map_per_session.png", "latest",
              "train.log", "checkpoints", "added_sessions.json", ".mlcil-run",
              ".replaced"}  # fmt: skip
    hits = [
        f"{path.relative_to(SRC)}:{line} {value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in RUN_FOLDER_OWNER
        for line, value in string_literals(path)
        if value in layout
    ]
    assert not hits, hits


def calls_to(attribute: str, owner: str | None = None) -> list[str]:
    """Modules calling ``<anything or owner>.<attribute>(...)``."""
    return [
        module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attribute
        and (owner is None or ast.unparse(node.func.value) == owner)
    ]


def test_one_inference_loop_puts_networks_in_eval_mode() -> None:
    # Freezing a teacher (methods, checkpoint restore) and the backbone's shape probe are not
    # inference passes over data; every pass over a loader goes through mlcil.inference.infer.
    allowed = {"mlcil.inference", "mlcil.methods.base", "mlcil.engine.checkpoint",
               "mlcil.models.backbones"}  # fmt: skip
    assert set(calls_to("eval")) <= allowed, calls_to("eval")
    users = set(calls_to("infer")) | {
        module for module, targets in import_graph().items() if "mlcil.inference" in targets
    }
    for module in ("mlcil.engine.evaluate", "mlcil.diagnostics", "mlcil.api"):
        assert module in users, module
    assert "mlcil.methods.context" in users  # the methods' own passes (SessionContext.score_pass)


def test_the_runtime_is_made_at_the_entry_points_only() -> None:
    makers = calls_to("from_config", owner="Runtime")
    assert "mlcil.runs" in makers and set(makers) <= {"mlcil.runs", "mlcil.experiment"}, makers


def test_a_run_folder_is_opened_by_one_module() -> None:
    # Reading a run's config.yaml back (load, eval, resume, add-session) happens in mlcil.runs;
    # compare only compares a planned config with a saved one; the folder's owner hashes its
    # bytes for the marker.
    readers = [
        module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "config_file"
    ]
    allowed = {"mlcil.runs", "mlcil.compare", "mlcil.engine.loop", "mlcil.rundir"}
    assert set(readers) <= allowed, readers


def test_the_run_plan_is_frozen_and_the_experiment_exposes_it_read_only() -> None:
    from mlcil.experiment import Experiment, RunPlan

    assert RunPlan.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for name in ("sessions", "class_names", "train_source", "test_source"):
        attribute = getattr(Experiment, name)
        assert isinstance(attribute, property) and attribute.fset is None, name


def stream_constants() -> dict[str, str]:
    """Every module-level ``*_STREAM = "name"`` of the package: ``module.CONSTANT -> name``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.endswith("_STREAM")
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                found[f"{module_name(path)}.{node.targets[0].id}"] = node.value.value
    return found


def test_named_random_streams_never_coincide() -> None:
    from mlcil.runtime import stream_key

    streams = stream_constants()
    assert len(streams) >= 6, streams  # growth, memory, threshold pass, AGCN, oEWC, BiC
    names = list(streams.values())
    assert len(set(names)) == len(names), streams
    keys = [stream_key(name) for name in names]
    assert len(set(keys)) == len(keys)
    # Far from every epoch, session or rank number a seed is also derived from.
    assert min(keys) > 2**32
    # No numbered offset is left: every derive_seed part is a name or a position variable.
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("derive_seed"):
                for argument in node.args[1:]:
                    literal = isinstance(argument, ast.Constant)
                    assert not (literal and isinstance(argument.value, int)), ast.unparse(node)


OUTPUT_LAYER = ("mlcil.record", "mlcil.results", "mlcil.plots", "mlcil.report")


def test_no_module_of_the_output_layer_is_over_400_lines() -> None:
    paths = [
        path for path in sorted(PACKAGE.rglob("*.py")) if module_name(path).startswith(OUTPUT_LAYER)
    ]
    assert {module_name(p) for p in paths} >= {"mlcil.results", "mlcil.report.html"}
    long = {module_name(p): n for p in paths if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_metrics_json_is_written_and_read_only_through_the_typed_record() -> None:
    # The file's name is the run folder's; only mlcil.results opens it (mlcil.record's
    # RunMetrics parses and writes its text), and the report parses no JSON of its own.
    users = {
        module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if re.search(r"\bMETRICS_JSON\b|\.metrics_file\b", path.read_text())
    }
    assert users == {"mlcil.rundir", "mlcil.run_layout", "mlcil.results"}, users
    report = [p for p in (PACKAGE / "report").rglob("*.py") if "json.load" in p.read_text()]
    assert not report, report


# --- size helper (issue 25 item 7) ---


def test_no_module_of_the_package_is_over_550_lines() -> None:
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    assert sizes["cli/__init__.py"] > 0 and sizes["compare/workers.py"] > 0  # the walk sees them
    long = {name: lines for name, lines in sizes.items() if lines > 550}
    assert not long, f"modules over 550 lines: {long}"


# --- engine helper (issue 25 items 3, 4) ---

# The entry points: the CLI, the Python API, the launcher, the comparison grid, and mlcil.runs
# (start_run / open_run / resume_run, which the CLI and the API call; it holds make_runtime).
ENTRY_POINTS = {"mlcil.cli", "mlcil.api", "mlcil.launch", "mlcil.compare", "mlcil.runs"}


def annotations_naming(tree: ast.Module, name: str) -> list[str]:
    """``function(argument)`` for every parameter or return annotation that names ``name``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
            annotated = [(a.arg, a.annotation) for a in every] + [("return", node.returns)]
            for argument, annotation in annotated:
                if annotation is not None and re.search(rf"\b{name}\b", ast.unparse(annotation)):
                    found.append(f"{node.name}({argument})")
    return found


def test_annotations_naming_sees_parameters_and_returns() -> None:
    tree = ast.parse("def f(a: Experiment, *, b: int) -> list[Experiment]: ...\n")
    assert annotations_naming(tree, "Experiment") == ["f(a)", "f(return)"]
    assert annotations_naming(ast.parse("def g(x: MyExperiment) -> None: ..."), "Experiment") == []


def test_the_engine_functions_do_not_take_an_experiment() -> None:
    trees = modules()
    engine = {name: tree for name, tree in trees.items() if name.startswith("mlcil.engine.")}
    assert "mlcil.engine.loop" in engine and "mlcil.engine.checkpoint" in engine
    takers = {name: annotations_naming(tree, "Experiment") for name, tree in engine.items()}
    assert not any(takers.values()), takers
    # Nor do they import it, even for type checking: the experiment lives above the engine.
    importers = [
        name
        for name, tree in engine.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "mlcil.experiment"
    ]
    assert not importers, importers
    assert annotations_naming(trees["mlcil.diagnostics"], "Experiment")  # the check sees them


def runtime_makers() -> dict[str, list[str]]:
    """module -> its calls that make a runtime: ``Runtime(...)``, ``Runtime.from_config``,
    ``make_runtime``."""
    makers: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if called in ("Runtime", "Runtime.from_config") or called.endswith("make_runtime"):
                    makers.setdefault(module_name(path), []).append(called)
    return makers


def test_only_the_entry_points_make_a_runtime() -> None:
    makers = runtime_makers()
    # The CLI and the comparison grid are packages: a module of one counts as that entry point.
    by_entry = {".".join(m.split(".")[:2]): m for m in makers}
    assert {"mlcil.cli", "mlcil.runs"} <= set(by_entry), makers  # the check sees real calls
    assert set(by_entry) <= ENTRY_POINTS, makers
    # mlcil.runs.make_runtime is the one maker; the entry points call it.
    assert makers["mlcil.runs"].count("Runtime.from_config") == 1, makers
    assert all(
        calls == ["make_runtime"] * len(calls) for m, calls in makers.items() if m != "mlcil.runs"
    )
    # An experiment never makes one: its runtime has no default.
    from mlcil.experiment import Experiment

    parameter = inspect.signature(Experiment).parameters["runtime"]
    assert parameter.default is inspect.Parameter.empty


# --- storage helper (issue 25 item 6) ---

RUN_LAYOUT = ("config.yaml", "metrics.json", "metrics.csv", "map_per_session.png", "latest",
              "train.log", "checkpoints", "added_sessions.json", ".mlcil-run", ".replaced",
              "tensorboard", "tracking", "phase.json")  # fmt: skip
# Layout paths still built outside the owner in modules another change owns; each is to go
# through RunDir (rundir.mid_session_name, RunDir.metrics_file / plot_file), then leave here.
KNOWN_LAYOUT_LEAKS: set[tuple[str, str]] = set()


def layout_in_fstring(text: str) -> bool:
    """Whether a literal part of an f-string names a layout entry as a path: the whole part
    (``f"{run}" + "checkpoints"``), a name joined to a formatted path (``f"{run}/metrics.json"``)
    or a checkpoint folder's prefix (``f"session_{i:02d}"``); prose that mentions a file is not."""
    if re.match(r"session_([0-9]|$)", text):
        return True
    return any(
        re.match(rf"/?{re.escape(name)}(/|\s|$)", text) and (text == name or text[0] == "/")
        for name in RUN_LAYOUT
    )


def test_layout_in_fstring_tells_paths_from_prose() -> None:
    assert layout_in_fstring("/metrics.json") and layout_in_fstring("session_")
    assert layout_in_fstring("/checkpoints/") and layout_in_fstring("latest")
    assert not layout_in_fstring("metrics.json has no ") and not layout_in_fstring(" holds no")
    assert not layout_in_fstring("session_maps has NaN")
    assert not layout_in_fstring("); write a name into checkpoints/latest")


def test_no_fstring_builds_a_run_folder_path_outside_its_owner() -> None:
    hits = {
        (str(path.relative_to(SRC)), part.value)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in RUN_FOLDER_OWNER
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.JoinedStr)
        for part in node.values
        if isinstance(part, ast.Constant) and layout_in_fstring(str(part.value))
    }
    assert hits <= KNOWN_LAYOUT_LEAKS, sorted(hits - KNOWN_LAYOUT_LEAKS)


OWNER_MODULES = ("mlcil.rundir", "mlcil.run_layout", "mlcil.run_overwrite")


def test_layout_names_are_imported_only_by_the_owner_and_known_modules() -> None:
    # A module joining RunDir's names to a path by hand (run_dir / METRICS_JSON) bypasses the
    # owner as much as a literal does; names a module may still import are listed.
    allowed = {
        # the checkpoint writer points LATEST at a new checkpoint and drops older mid-session
        # folders inside its one atomic write
        "mlcil.engine.checkpoint": {"LATEST", "MID_SESSION"},
        "mlcil.added_sessions": {"ADDED_SESSIONS"},  # the file's name in its messages
    }
    for name, tree in modules().items():
        if name in OWNER_MODULES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in OWNER_MODULES:
                layout = {a.name for a in node.names if a.name.isupper()}
                assert layout <= allowed.get(name, set()), (name, layout)


def test_every_kind_of_component_is_named_in_one_registry_shape() -> None:
    # Methods, networks, memory policies, datasets and trackers: each kind one mlcil.registry
    # Entries (name -> entry, the same refusal of a taken name, the same unknown-name error),
    # and no module keeps a plain dict of components of its own.
    from mlcil import trackers
    from mlcil.data.dataset_spec import DATASETS
    from mlcil.memory_policies import MEMORY_POLICIES
    from mlcil.methods.registry import METHODS
    from mlcil.models.registry import NETWORKS
    from mlcil.registry import Entries

    kinds = {r.kind: r for r in (METHODS, NETWORKS, MEMORY_POLICIES, DATASETS, trackers.TRACKERS)}
    assert set(kinds) == {"method", "network", "memory policy", "dataset", "tracker"}
    assert all(isinstance(registry, Entries) for registry in kinds.values())
    assert {"coco", "voc", "digits"} <= set(DATASETS) and {"csv", "wandb"} <= set(trackers.TRACKERS)
    plain = [
        module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if re.search(r"^_?[A-Z_]*REGISTRY\w*\s*(:[^=]*)?=\s*(\{|dict\()", path.read_text(), re.M)
    ]
    assert not plain, plain
