"""Package discovery: every subpackage is found, so none can be left out of the wheel.

Two subpackages live in top-level folders (``kernels/`` is ``halluguard.kernels``, ``eval/`` is
``halluguard.eval``); everything else is under ``halluguard/``. Metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = {"halluguard": "halluguard", "halluguard.kernels": "kernels", "halluguard.eval": "eval"}

packages = [sub for name, folder in ROOTS.items() for sub in [name, *(f"{name}.{p}" for p in find_packages(folder))]]
setup(packages=packages, package_dir=ROOTS)
