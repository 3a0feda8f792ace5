"""The house's layout holds: imports run one way (core <- promotion <- monitoring <- serve,
retrain <- cli), every package folder is installed under the `asrops` namespace, loggers are
named after their modules, and the lint the test command runs passes.

Why by hand and not import-linter: its import graph (grimp) walks a package's own folder on
disk, and ours maps `asrops.serve` to serve/ (setuptools' package-dir), which it cannot follow.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
FOLDER_OF = {"asrops": "asrops", **SETUPTOOLS["package-dir"]}
"""Top-level package name -> repository folder."""

RANK = {"asrops": 0, "asrops.promotion": 1, "asrops.monitoring": 2, "asrops.serve": 3, "asrops.retrain": 3,
        "asrops.k8s": 4, "asrops.cli": 5}
"""What may import what: a part imports only parts of a lower rank (and itself). Promotion and
monitoring sit on the core; monitoring reads promotion's queries (to check every PromQL the
product ships), never the other way round. Serve and retrain never import each other. k8s
renders manifests from what serve and monitoring ship; only the CLI sits above it."""


def _part_of(module: str) -> str:
    for part in sorted(RANK, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    raise AssertionError(f"{module} belongs to no part")


def _modules() -> dict[str, Path]:
    """Every installed module by its dotted name, from the package-dir mapping."""
    found = {}
    nested = {pkg for pkg in FOLDER_OF if pkg != "asrops"}
    for package, folder in FOLDER_OF.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "asrops" and any(name == n or name.startswith(n + ".") for n in nested):
                continue
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}; use the full asrops name"
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_every_package_folder_is_installed_under_the_asrops_namespace():
    folders = {f"{pkg}{'.' if sub else ''}{'.'.join(sub)}"
               for pkg, folder in FOLDER_OF.items()
               for init in (ROOT / folder).rglob("__init__.py")
               if (sub := init.parent.relative_to(ROOT / folder).parts) is not None}
    assert folders == set(SETUPTOOLS["packages"]), "pyproject's [tool.setuptools] packages and the tree differ"
    for old in ("serve", "retrain", "monitoring", "promotion", "cli"):
        assert not (ROOT / "asrops" / old).exists(), f"asrops/{old}/ would shadow the {old}/ folder"


def test_imports_run_one_way():
    wrong = []
    for module, path in _modules().items():
        mine = _part_of(module)
        for imported in _imports(path):
            if imported == "asrops" or not imported.startswith("asrops."):
                if imported.split(".")[0] in {"serve", "retrain", "monitoring", "promotion", "cli"}:
                    wrong.append(f"{module} imports {imported}: a bare top-level name; use asrops.{imported}")
                continue
            theirs = _part_of(imported)
            if theirs != mine and RANK[theirs] >= RANK[mine]:
                wrong.append(f"{module} ({mine}) imports {imported} ({theirs})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_layering_check_sees_a_violation(tmp_path):
    """The check above can fail: a core module importing serve is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from asrops.serve.api import build_app\n")
    assert "asrops.serve.api" in _imports(bad) and RANK[_part_of("asrops.serve.api")] > RANK["asrops"]


def test_loggers_are_named_after_their_modules():
    literal = re.compile(r"getLogger\(\s*[\"']")
    named = [f"{name}" for name, path in _modules().items() if literal.search(path.read_text())]
    assert not named, f"use logging.getLogger(__name__) in: {named}"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_passes():
    ruff = str(Path(sys.executable).parent / "ruff") if (Path(sys.executable).parent / "ruff").exists() else "ruff"
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_layout_tables_match_the_tree():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout\n"):readme.index("\n## ", readme.index("## Layout\n") + 1)]
    paths = {p.split(":")[0] for p in re.findall(r"`([A-Za-z_./<>-]+(?:/|\.py|\.ya?ml|\.json|\.sh)[^`]*)`", layout)}
    missing = [p for p in paths if "<" not in p and not (ROOT / p).exists()
               and not any((ROOT / folder / p).exists() for folder in FOLDER_OF.values())]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"
    folders = {row.split("|")[1].strip().strip("`") for row in layout.splitlines() if row.startswith("| `")}
    top = {f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in
           {"build", "dist", "out", "data"} and not p.name.endswith(".egg-info")}
    assert top - folders == set(), f"top-level folders missing from the README's layout: {top - folders}"
    assert {f"{folder}/" for folder in FOLDER_OF.values()} <= folders


def test_the_serve_config_names_importable_builders():
    """serve/serve_config.yaml is valid for Serve and its import paths name real builders."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text()))
    for app in config.applications:
        module, _, name = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), app.import_path
