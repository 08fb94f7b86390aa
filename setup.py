"""Package discovery for the folder-per-subpackage layout (metadata lives in pyproject.toml).

The repository's top-level folders `merge/`, `objectives/`, `search/`, `experiments/` are installed
as `evomerge.merge`, ... . pyproject.toml alone can only list such remapped packages by hand, which
silently drops any subpackage someone forgets to add; here they are found.
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("merge", "objectives", "search", "experiments")

packages = []
for top in SUBPACKAGES:
    packages.append(f"evomerge.{top}")
    packages.extend(f"evomerge.{top}.{sub}" for sub in find_packages(top))

setup(packages=packages, package_dir={f"evomerge.{top}": top for top in SUBPACKAGES})
