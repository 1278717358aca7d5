"""The checkout never shadows an installed distribution.

Python started in the checkout's root (``python -m pytest``, ``python -c``, a script or notebook
there) has that folder first on ``sys.path``. The top-level ``kernels/`` and ``eval/`` folders
(``halluguard.kernels``, ``halluguard.eval``) have no ``__init__.py``, so there they are namespace
portions, which lose to any installed package of the same name: Hugging Face's ``kernels``, which
transformers imports with every model module, comes from the environment.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIND_EVERY_DISTRIBUTION = """
import importlib.metadata, importlib.util, json, sysconfig
found = {}
for name in sorted(importlib.metadata.packages_distributions()):
    if not name.isidentifier() or name == "halluguard":
        continue
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a top-level name that fails to resolve on its own is not ours to judge
        continue
    if spec is not None:
        found[name] = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
environment = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
print(json.dumps({"found": found, "environment": environment}))
"""


def _from_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_every_installed_distribution_resolves_outside_the_checkout_from_its_root():
    seen = json.loads(_from_root(FIND_EVERY_DISTRIBUTION))
    found, environment = seen["found"], [Path(p).resolve() for p in seen["environment"]]
    assert "torch" in found and "transformers" in found  # the check saw the environment

    def in_checkout(place: str) -> bool:  # the environment may live in the checkout (.venv)
        path = Path(place).resolve()
        return path.is_relative_to(ROOT) and not any(path.is_relative_to(env) for env in environment)

    shadowed = {name: places for name, places in found.items() if places and all(map(in_checkout, places))}
    assert not shadowed, f"the checkout shadows installed distributions: {shadowed}"


def test_model_modules_and_the_kernel_package_import_from_the_root():
    out = _from_root(
        "import importlib.metadata, importlib.util, transformers.activations\n"
        "import halluguard.kernels.decode_attention as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "try:\n"
        "    installed = importlib.metadata.distribution('kernels').locate_file('kernels/__init__.py')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    installed = ''\n"
        "print(k.__file__); print(spec.origin if spec and spec.origin else ''); print(installed)"
    )
    kernel_module, kernels_package, installed = out.splitlines()
    assert Path(kernel_module).name == "decode_attention.py"
    if installed:  # Hugging Face's kernels (a dependency of transformers 5.25 and later) is the one imported
        assert Path(kernels_package).resolve() == Path(installed).resolve()


def test_no_folder_beside_the_package_is_a_regular_package():
    regular = [p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "halluguard"]
    assert not regular, f"{regular} would shadow installed packages of the same name: drop their __init__.py"
