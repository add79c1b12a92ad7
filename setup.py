# kernels/ sits at the top of the repository but installs as `vitscale.kernels`: the top-level
# import name `kernels` belongs to another PyPI package.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["vitscale", "vitscale.*"]) + ["vitscale.kernels"],
    package_dir={"vitscale.kernels": "kernels"},
)
