"""The package's structure: no import cycle among r1vl_fast's modules (function-level imports counted), the kernels
reached as ``r1vl_fast.kernels`` without any ``__path__`` patch and never as a top-level ``kernels`` that would
shadow Hugging Face's, and an editable install that works from the checkout and from elsewhere, as a contributor
uses it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import r1vl_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(r1vl_fast.__file__).resolve().parent  # the installed copy (or the checkout, when editable)


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    paths = [Path(d) / f for d, _, files in os.walk(root, followlinks=True) for f in files if f.endswith(".py")]
    for path in sorted(paths):
        parts = ["r1vl_fast", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every r1vl_fast module that ``name`` imports, anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_the_package_modules() -> None:
    modules = _modules(REPO / "r1vl_fast")
    assert "r1vl_fast.kernels.grpo_loss" in modules and "r1vl_fast.rollout.vllm_engine" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "r1vl_fast.kernels.grpo_loss" in graph["r1vl_fast.ops.launch"]  # the graph sees function-level imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # and the checker does find a cycle when there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_kernels_live_in_the_top_level_folder_and_nothing_patches_the_package_path() -> None:
    link = REPO / "r1vl_fast" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()
    assert (REPO / "kernels" / "grpo_loss.py").is_file()
    for path in _modules(REPO / "r1vl_fast").values():
        assert "__path__" not in path.read_text(encoding="utf-8"), path
    import r1vl_fast.kernels.grpo_loss as kernels

    assert Path(kernels.__file__).parent.parent == PACKAGE  # r1vl_fast.kernels, wherever r1vl_fast came from


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source checkout")
def test_the_kernels_folder_never_shadows_hugging_faces_kernels_package(tmp_path: Path) -> None:
    """``kernels/`` has no ``__init__.py``: from the checkout's root, where the working directory comes first on
    ``sys.path``, a ``kernels`` package installed anywhere (Hugging Face's, which the newest transformers imports)
    is the one ``import kernels`` finds; the folder only counts as a namespace portion when there is none. CI runs
    the README's command from the root with the real one installed (.ci/run, "the newest Hugging Face stack")."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("class CUDAProperties: ...\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    probe = "import kernels; from kernels import CUDAProperties; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == installed / "__init__.py"


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source checkout")
def test_editable_install_works_from_the_checkout_and_from_elsewhere(tmp_path: Path) -> None:
    """``pip install -e .``: the package is the checkout, the compiled matcher is found, ``r1vl_fast.kernels`` is the
    top-level ``kernels/``; from the checkout's root too, where a plain install would be shadowed."""
    pytest.importorskip("scikit_build_core", reason="the test extra installs scikit-build-core")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # pip of the outer interpreter, installing into the new environment (no build isolation: no downloads)
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
               "-q", "-e", str(REPO)]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = ("import r1vl_fast, r1vl_fast._keystep, r1vl_fast.kernels.grpo_loss as k\n"
             "from r1vl_fast.rewards import step_rvr\n"
             "print(r1vl_fast.__file__); print(k.__file__); print(step_rvr(['x'])[0])")
    for cwd in (REPO, tmp_path):
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        package_file, kernel_file, valid = out.stdout.split()
        assert Path(package_file).resolve() == (REPO / "r1vl_fast" / "__init__.py").resolve()
        assert Path(kernel_file).resolve() == (REPO / "kernels" / "grpo_loss.py").resolve()
        assert valid == "0.0"
