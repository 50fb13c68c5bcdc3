"""The package stands on its own, apart from the checkout's tests/ and the lab's extras.

- No module of `coordinator` or `node` imports `tests` or names a `tests.` module as a string
  (`-m tests.x`, import_module); the serving code never imports `coordinator.lab`, and `node`
  never imports `coordinator`. Read from the source, so these run in the fast suite.
- A wheel built from the checkout holds every module and the package data (calibration,
  dashboard, schemas) and nothing of tests/. Installed into a fresh venv with its dependencies
  only (no test extra, no llama-cpp-python), every module imports and every command of
  `coordinator` and `cluster-node`, found by walking their argparse parsers, answers --help:
  the two installed scripts themselves, and every command through the console-script entry
  point the wheel declares, all in one process (a Python start per command was a third of
  the test). Slow: the install resolves the dependencies from pip's cache or PyPI (about
  15 s here); this environment's pip installs into the venv (`pip --python`), so the venv
  is made without pip of its own (ensurepip and Python's bundled pip, far slower to
  resolve, were half of the test).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "node")
GENERATED = REPO / "node" / "_proto"
LAB = REPO / "coordinator" / "lab"
COMMANDS = REPO / "coordinator" / "commands"
# Files the wheel must carry besides the modules (pyproject's package-data).
DATA_SUFFIXES = (".csv", ".json", ".html", ".js", ".css")
# Packages that only the test extra installs: nothing in the package may import them.
TEST_ONLY = ("tests", "pytest", "hypothesis", "playwright", "openai")


def source_modules() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if GENERATED not in path.parents and "__pycache__" not in path.parts:
                yield path


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import anywhere in the module, lazy ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # `from coordinator import lab` names a module too
                yield node.lineno, f"{node.module}.{alias.name}"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_no_module_imports_tests_or_a_test_only_package() -> None:
    found = []
    for path in source_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in imported_modules(tree):
            if name.split(".")[0] in TEST_ONLY:
                found.append(f"{rel(path)}:{line}: imports {name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("tests.")
            ):
                found.append(f"{rel(path)}:{node.lineno}: names the module {node.value!r}")
    assert not found, "\n".join(found)


def test_serving_code_does_not_import_the_lab() -> None:
    found = []
    for path in source_modules():
        lab_allowed = LAB in path.parents or COMMANDS in path.parents
        in_node = path.is_relative_to(REPO / "node")
        for line, name in imported_modules(ast.parse(path.read_text(), filename=str(path))):
            if in_node and name.split(".")[0] == "coordinator":
                found.append(f"{rel(path)}:{line}: node imports {name}")
            elif not lab_allowed and (name + ".").startswith("coordinator.lab."):
                found.append(f"{rel(path)}:{line}: serving code imports {name}")
    assert not found, "\n".join(found)


# The check run inside the fresh venv: import every module of both packages (each must come
# from the venv, not from a checkout), then list every command line to try with --help.
IN_VENV = r"""
import argparse, importlib, importlib.util, json, pkgutil, sys

failed, outside = [], []
for top in ("coordinator", "node"):
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        try:
            module = importlib.import_module(info.name)
        except Exception as e:
            failed.append(f"{info.name}: {type(e).__name__}: {e}")
            continue
        if not str(getattr(module, "__file__", "")).startswith(sys.prefix):
            outside.append(f"{info.name}: {module.__file__}")

def commands(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, [*prefix, name])

import coordinator.main, node.main
lines = [["coordinator", *c] for c in commands(coordinator.main.build_parser(), [])]
lines += [["cluster-node", *c] for c in commands(node.main.build_parser(), [])]
present = [m for m in ("pytest", "llama_cpp") if importlib.util.find_spec(m) is not None]
print(json.dumps({"failed": failed, "outside": outside, "commands": lines, "present": present}))
"""

# Run in a fresh process of the venv with the command lines as JSON on stdin: each one through
# the console-script entry point the installed wheel declares (what bin/<script> runs), with
# --help; the exit code and what it printed, per command.
HELPS = r"""
import contextlib, io, json, sys
from importlib.metadata import entry_points

results = []
for argv in json.load(sys.stdin):
    (ep,) = entry_points(group="console_scripts", name=argv[0])
    main = ep.load()
    sys.argv = [argv[0], *argv[1:], "--help"]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:
            code, err = -1, io.StringIO(f"{type(e).__name__}: {e}")
    results.append({"argv": argv, "dist": ep.dist.name if ep.dist else None, "code": code,
                    "stdout": out.getvalue(), "stderr": err.getvalue()[-2000:]})
print(json.dumps(results))
"""


def clean_env() -> dict[str, str]:
    """This environment without anything that would put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(
    argv: list[str], cwd: Path, timeout: float, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=clean_env(), input=stdin, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the package sources (the build leaves build/ in the tree it reads)."""
    src = tmp_path / "src"
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    # This environment's setuptools builds it; without one (Python 3.12+ venvs lack it) pip
    # fetches the build requirements for an isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    out = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist),
         str(src)],
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout}\n{out.stderr}"
    wheels = list(dist.glob("layerlink-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def expected_files() -> set[str]:
    return {
        rel(p)
        for package in PACKAGES
        for p in (REPO / package).rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix == ".py" or p.suffix in DATA_SUFFIXES)
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_in_a_fresh_venv_imports_every_module_and_runs_every_help(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = expected_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    for data in ("coordinator/data/calibration.csv", "coordinator/dashboard/static/index.html",
                 "coordinator/dashboard/static/dashboard.js",
                 "coordinator/schemas/probe.schema.json"):  # fmt: skip
        assert data in names
    tops = {n.split("/")[0] for n in names if not n.startswith("layerlink-")}
    assert tops == set(PACKAGES), f"the wheel holds more than the packages: {sorted(tops)}"

    venv = tmp_path / "venv"
    out = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path,
              timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # Dependencies only (no [test]), from pip's cache where it has them, by this environment's
    # pip aimed at the venv's interpreter. --no-compile: byte-compiling every dependency is a
    # quarter of the install; imports compile what they load.
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
               "--no-compile", str(wheel)]  # fmt: skip
    out = run(install, cwd=tmp_path, timeout=780)
    assert out.returncode == 0, f"installing the wheel failed:\n{out.stdout}\n{out.stderr[-4000:]}"

    out = run([str(python), "-c", IN_VENV], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["present"] == [], f"the fresh venv is not bare: {report['present']}"
    assert report["failed"] == [], "modules that do not import:\n" + "\n".join(report["failed"])
    assert report["outside"] == [], "modules loaded from outside the venv:\n" + "\n".join(
        report["outside"]
    )
    commands = report["commands"]
    assert ["coordinator", "up"] in commands and ["cluster-node", "up"] in commands, commands

    failures = []
    for script in ("coordinator", "cluster-node"):  # the installed scripts themselves
        out = run([str(bin_dir / script), "--help"], cwd=tmp_path, timeout=120)
        if out.returncode != 0 or "usage:" not in out.stdout:
            failures.append(f"{script} --help: exit {out.returncode}\n{out.stderr[-2000:]}")
    out = run([str(python), "-c", HELPS], cwd=tmp_path, timeout=300, stdin=json.dumps(commands))
    assert out.returncode == 0, out.stderr[-4000:]
    helps = json.loads(out.stdout.splitlines()[-1])
    assert [h["argv"] for h in helps] == commands
    for h in helps:
        if h["code"] != 0 or "usage:" not in h["stdout"] or h["dist"] != "layerlink":
            failures.append(f"{' '.join(h['argv'])} --help: exit {h['code']} (entry point of "
                            f"{h['dist']})\n{h['stderr']}")  # fmt: skip
    assert not failures, "\n".join(failures)
