"""The command line's help (fast: no torch or transformers imported; complete: every option explained with its
default) and the package layout (no import cycles; function-local imports only where --help speed needs them)."""

import argparse
import ast
import json
import pathlib
import subprocess
import sys

import pytest

from fastbertology.cli import COMMANDS, build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastbertology"
HEAVY = ("torch", "transformers", "numpy", "matplotlib")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_imports_nothing_heavy():
    """``fastbertology --help`` and every command's --help run without importing torch or transformers (which take
    seconds): argparse only."""
    script = ("import sys, json\nfrom fastbertology.cli import main\n"
              f"for argv in [['--help']] + [[c, '--help'] for c in {sorted(set(COMMANDS) - {'bench'})!r}]:\n"
              "    try:\n        main(argv)\n    except SystemExit as exit:\n        assert exit.code == 0, argv\n"
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert "usage: fastbertology report" in result.stdout


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"bench"}))
def test_every_option_has_help_and_its_default(name):
    parser = _subcommands()[name]
    assert "Writes" in parser.description
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default not in (None, False):
            help_text = parser._get_formatter()._expand_help(action)
            assert "default" in help_text, f"{name} {action.option_strings} does not show its default"
    assert "``" not in text and "~2 min" not in text


def test_top_level_help_lists_every_command_with_what_it_writes():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert f"    {name}" in text
    assert "writes" in text and "report.html" in text


def test_each_command_shows_only_options_it_uses():
    commands = _subcommands()
    options = {name: {o for a in parser._actions for o in a.option_strings} for name, parser in commands.items()}
    assert not {"--importance", "--masking-threshold", "--dont-normalize-global-importance"} & options["sweep"]
    assert not {"--data", "--task", "--metric", "--data-subset"} & options["demo"]
    assert "--masking-amount" not in options["importance"] and "--head-mask" in options["prune"]
    assert {"--no-progress", "--output-dir", "--device"} <= options["sweep"] & options["mask"] & options["demo"]
    demo = commands["demo"].parse_args([])
    assert (demo.batch_size, demo.importance, demo.task) == (64, "per_example", "retrieval")
    assert "(default: 64)" in commands["demo"].format_help()
    # --data-subset 0 keeps every example (run_bertology's meaning); the help said only "the first N"
    assert "(default, or 0: all)" in " ".join(commands["importance"].format_help().split())


# ------------------------------------------------------------------------------------------------------ layout
def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """``(module imported, name, line, at module level)`` for every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    in_functions = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for inner in ast.walk(node)}
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level > 1:
                base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:
                yield target, alias.name, node.lineno, id(node) not in in_functions
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno, id(node) not in in_functions


def test_no_module_imports_one_that_imports_it_back():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, imported, _, _ in _imports(path):
            if not (target or "").startswith("fastbertology"):
                continue
            full = f"{target}.{imported}" if imported else target
            edges.add(full if full in modules else target)
        graph[name] = {e for e in edges if e in modules and e != name and not name.startswith(e + ".")}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a, set()))
    assert cycles == []


# Function-local imports in the command-line layer: only where --help speed needs them (each is commented there).
LAZY_IMPORTS = {("fastbertology.cli", "fastbertology.bench"), ("fastbertology.cli", "fastbertology.dispatch"),
                ("fastbertology.data", "fastbertology"),
                ("fastbertology.data.document_stream", "pyarrow.parquet")}  # optional: the parquet extra
CLI_LAYER = ["cli.py", "dispatch.py", "commands.py", "sweep_command.py", "gates_command.py", "patching_command.py",
             "sweep_checkpoint.py", "run_setup.py",
             "runs.py", "console.py", "task_selection.py", "mask_files.py", "attention_patterns.py", "plots.py",
             "batching.py", "data", "report"]


def test_cli_layer_imports_at_the_top():
    found = set()
    for entry in CLI_LAYER:
        paths = sorted((PACKAGE / entry).rglob("*.py")) if (PACKAGE / entry).is_dir() else [PACKAGE / entry]
        for path in paths:
            for target, _, line, top_level in _imports(path):
                if not top_level:
                    found.add((_module_name(path), target))
                    above = path.read_text().splitlines()[max(line - 4, 0):line - 1]
                    assert any("#" in text for text in above), f"{path}:{line}: a lazy import with no comment why"
    assert found <= LAZY_IMPORTS, f"function-local imports outside the allowed ones: {sorted(found - LAZY_IMPORTS)}"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0].strip() for block in readme.split("```bash\n")[1:3]]
    assert blocks[0].endswith("fastbertology demo") and blocks[1].endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == blocks[1]
