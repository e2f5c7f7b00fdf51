"""The package layers: no import from a lower layer up, no import circle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "protorefine_jax"
# The core: every module at the package's top level (a new one is core from
# its first commit). The upper layers: its subpackages, and the experiments.
CORE = tuple(sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
UPPER = ("features", "clip", "data", "detectors", "io", "app", "cli", "experiments")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules imported at module level, `if TYPE_CHECKING:` blocks included."""
    out = set()
    body = []
    for node in ast.parse(path.read_text()).body:
        body += node.body if isinstance(node, ast.If) else [node]
    for node in body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("protorefine_jax", "experiments")}


def graph() -> dict[str, set[str]]:
    files = [*REPO.glob("protorefine_jax/**/*.py"), *REPO.glob("experiments/**/*.py")]
    names = {module_name(f): f for f in files}
    # An import of `pkg.name` counts as an edge to the module `pkg.name` if it is one.
    return {n: {m for m in imports(f) if m in names and m != n} for n, f in names.items()}


def test_layers_cover_the_package():
    """Every top-level module is core (none left out of the check), every subpackage upper."""
    named = {
        *("bank", "calibration", "checks", "config", "coreset", "export", "gram", "metrics"),
        *("padding", "pipeline", "refine", "scoring", "sharding", "stream_calibration"),
        *("threshold",),
        "transport",
    }
    assert named <= set(CORE), sorted(named - set(CORE))
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(UPPER) - {"experiments"}, sorted(subpackages ^ set(UPPER))


def test_core_imports_nothing_above_it():
    g = graph()
    for name in CORE:
        bad = [
            m
            for m in g[f"protorefine_jax.{name}"]
            if m.startswith("experiments") or m.split(".")[1:2] in ([u] for u in UPPER)
        ]
        assert not bad, f"protorefine_jax.{name} imports {bad}"


def test_library_imports_nothing_from_experiments():
    for name, deps in graph().items():
        if name.startswith("protorefine_jax"):
            assert not [d for d in deps if d.startswith("experiments")], name


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in g[node]:
            # A package's __init__ re-exporting its modules is not a circle.
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                raise AssertionError(" -> ".join([*stack, node, dep]))
            if not state.get(dep):
                visit(dep, [*stack, node])
        state[node] = 2

    for node in g:
        if not state.get(node):
            visit(node, [])


def test_the_engine_never_imports_research():
    """eval, fit, predict and the bench import nothing under experiments/research/."""
    g = graph()
    engine = [
        n for n in g if n.startswith(("experiments.", "protorefine_jax")) and ".research" not in n
    ]
    assert "protorefine_jax.app.deploy" in engine and "protorefine_jax.cli.eval" in engine
    for name in engine:
        bad = sorted(m for m in g[name] if m.startswith("experiments.research"))
        assert not bad, f"{name} imports research code {bad}"
    assert any(n.startswith("experiments.research.") for n in g)


def test_the_app_layer_sits_between_the_library_and_the_command_lines():
    """Library -> app -> cli, never back; experiments' eval, fit and predict are thin shims."""
    g = graph()

    def layer(name: str) -> str | None:
        parts = name.split(".")
        return (
            parts[1] if parts[0] == "protorefine_jax" and parts[1:2] in (["app"], ["cli"]) else None
        )

    for name, deps in g.items():
        if name.startswith("protorefine_jax") and layer(name) is None:
            assert not [m for m in deps if layer(m)], name
        if layer(name) == "app":
            assert not [m for m in deps if layer(m) == "cli" or m.startswith("experiments")], name
            path = REPO / name.replace(".", "/")
            text = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
            assert "DEFINE_" not in text, (
                f"{name} defines flags; they belong to protorefine_jax.cli"
            )
    for tool in ("eval", "fit", "predict"):
        text = (REPO / "experiments" / f"{tool}.py").read_text()
        assert len(text.splitlines()) <= 20 and f"protorefine_jax.cli.{tool} import run" in text


def test_the_library_and_app_layers_set_no_process_wide_state():
    """No `os.environ[...] =`, `os.putenv`, `environ.setdefault/update` or `jax.config.update`
    below the command lines: what a process starts with is the CLI's (`cli.common`)."""
    offenders = []
    for path in REPO.glob("protorefine_jax/**/*.py"):
        if "cli" in path.relative_to(PACKAGE).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            writes = any(
                isinstance(t, ast.Subscript) and ast.unparse(t.value).endswith("environ")
                for t in targets
            )
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner, attr = ast.unparse(node.func.value), node.func.attr
                writes |= owner.endswith("environ") and attr in ("setdefault", "update", "pop")
                writes |= attr == "putenv" or (owner == "jax.config" and attr == "update")
            if writes:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
