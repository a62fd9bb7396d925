"""Package-level promises: the public API imports, test-only oracles stay out, docs match CI."""

import pathlib
import pkgutil
import subprocess
import sys

import jaxquant

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_public_api_names_exist():
    for name in jaxquant.__all__:
        assert hasattr(jaxquant, name), name


def test_package_never_imports_test_oracles():
    """torch, nvidia-modelopt and accelerate are test-only: importing every jaxquant module must not
    pull them in (run in a fresh interpreter so this test's own imports don't count)."""
    mods = [m.name for m in pkgutil.walk_packages(jaxquant.__path__, "jaxquant.") if not m.name.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(k for k in ('torch', 'modelopt', 'accelerate') if k in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"jaxquant imports test-only packages: {out.stdout.strip()}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "pip install -e '.[test]' && pip install --no-deps -r requirements-assets.txt && pytest -q"
    assert cmd in readme and cmd in ci
