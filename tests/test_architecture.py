"""Architecture contracts: vcnn runs where only torch is installed; meshes needs no solver."""

import pkgutil
import subprocess
import sys

import vcnn

BLOCKER = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed here")
        return None

sys.meta_path.insert(0, Block())
import importlib
for module in {modules!r}:
    importlib.import_module(module)
print("ok")
"""


def run_isolated(blocked, modules):
    code = BLOCKER.format(blocked=set(blocked), modules=list(modules))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def vcnn_modules():
    return ["vcnn"] + [f"vcnn.{m.name}" for m in pkgutil.iter_modules(vcnn.__path__)]


def test_vcnn_imports_without_the_fem_stack():
    result = run_isolated(
        {"dolfinx", "gmsh", "meshio", "petsc4py", "basix", "ufl", "solvers", "meshes"},
        vcnn_modules(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_blocker_really_blocks():
    result = run_isolated({"dolfinx"}, ["solvers.flow"])
    assert result.returncode != 0 and "dolfinx is not installed here" in result.stderr


def test_meshes_package_imports_without_dolfinx_or_solvers():
    result = run_isolated({"dolfinx", "gmsh", "meshio", "solvers", "vcnn", "torch"}, ["meshes"])
    assert result.returncode == 0, result.stderr


def test_cli_without_fem_stack_says_what_to_install(tmp_path):
    code = BLOCKER.format(blocked={"dolfinx", "solvers"}, modules=[]).replace(
        'print("ok")',
        "from vcnn.cli import main\n"
        f"raise SystemExit(main(['generate', '--alphas', '1', '--out', {str(tmp_path)!r}]))",
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install 'vcnn-closures[fem]'" in result.stderr
