"""Packaging shim: the YAML recipes live in the top-level ``recipes/`` folder and install as the
``jaxquant_recipes`` package (as ModelOpt ships ``modelopt_recipes``). Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["jaxquant", "jaxquant.*"]) + ["jaxquant_recipes"],
    package_dir={"jaxquant_recipes": "recipes"},
)
