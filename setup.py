"""Package discovery: every subpackage is found, so none can be left out of the wheel.

Two subpackages live in top-level folders, ``kernels/`` (``halluguard.kernels``) and ``eval/``
(``halluguard.eval``), reached as ``halluguard/kernels`` and ``halluguard/eval`` through symbolic links.
Neither folder has an ``__init__.py``: from the checkout root they are namespace portions, which never
shadow an installed distribution of the same name (Hugging Face's ``kernels``, which transformers imports).
Metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

LINKED = ["halluguard.kernels", "halluguard.eval"]

setup(packages=["halluguard", *(f"halluguard.{p}" for p in find_packages("halluguard")), *LINKED])
