"""The package's import structure: no import cycle, every module importable on its own, and the core usable
without the ``eval`` extra (lm-eval, matplotlib) installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed names of the source folders (pyproject.toml's package-dir).
FOLDERS = {"h2o_cache": ROOT / "h2o_cache", "h2o_cache.patches": ROOT / "patches", "h2o_cache.eval": ROOT / "eval"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if "tasks" in parts:  # lm-eval loads eval/tasks/*.py by file path, not as package modules
                continue
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path], *, lazy: bool = False) -> set[str]:
    """Modules of the package that ``name`` imports when it is imported; ``lazy`` adds the imports inside its
    functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base in modules:
                    out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycle_and_core_does_not_import_eval():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert not _cycles(graph)
    core = [n for n in graph if not n.startswith("h2o_cache.eval")]
    assert not [(n, sorted(graph[n])) for n in core if any(m.startswith("h2o_cache.eval") for m in graph[n])]
    # In eval, not even an import inside a function closes a cycle (that is how the last one hid).
    evals = {n: p for n, p in modules.items() if n.startswith("h2o_cache.eval")}
    lazy = {n: {m for m in _imports(n, p, modules, lazy=True) if m in evals} for n, p in evals.items()}
    assert not _cycles(lazy)


def test_every_module_imports_on_its_own():
    """Each module imported first (the package's modules dropped from sys.modules in between), in one fresh
    interpreter: a hidden cycle or a missing import shows as an ImportError naming the module."""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'h2o_cache' or m.startswith('h2o_cache.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        sys.exit(f'{name}: {type(err).__name__}: {err}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


BLOCK_EVAL_EXTRAS = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('lm_eval', 'matplotlib'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_core_works_without_the_eval_extra():
    code = BLOCK_EVAL_EXTRAS + (
        "import contextlib, io, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from h2o_cache import H2OCache, H2OConfig\n"
        "from h2o_cache.cli import main\n"
        "from h2o_cache.runner import timed_generate\n"
        "torch.manual_seed(0)\n"
        "model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,\n"
        "    num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()\n"
        "ids = torch.randint(3, 128, (1, 40))\n"
        "out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation='h2o',\n"
        "                     cache_config={'heavy_budget': 4, 'recent_budget': 4})\n"
        "assert out.shape == (1, 44)\n"
        "res = timed_generate(model, ids, None, H2OConfig(heavy_budget=4, recent_budget=4), 4)\n"
        "assert res.tokens_kept == 8 and res.kv_bytes > 0\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'lm-eval' in buf.getvalue() and 'bench' in buf.getvalue()\n"
        "assert main(['lm-eval', '--help']) == 2\n"
        "assert not [m for m in sys.modules if m.startswith(('lm_eval', 'matplotlib'))]\n"
        "import h2o_cache.eval  # importable too: the h2o model is registered only where lm-eval exists\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs lm-eval" in done.stderr


@pytest.mark.parametrize("command", ["eval", "bench", "ruler"])
def test_eval_commands_start_without_lm_eval(command):
    code = BLOCK_EVAL_EXTRAS + (
        "import contextlib\nfrom h2o_cache.cli import main\n"
        f"with contextlib.suppress(SystemExit):\n    main([{command!r}, '--help'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"h2o-cache {command}" in done.stdout, done.stderr[-3000:]
