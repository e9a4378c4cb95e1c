"""Package discovery (everything else is in pyproject.toml): every package under carlos_audit/,
data folders included as namespace packages, and the top-level templates/ folder shipped as
carlos_audit.templates (pyproject.toml maps it)."""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["carlos_audit*"], exclude=["*.__pycache__"])
      + ["carlos_audit.templates", "carlos_audit.templates.sections"])
