# kernels/ sits at the top of the repository but installs as `vitscale.kernels`: the top-level
# import name `kernels` belongs to another PyPI package. configs/ installs as data of
# `vitscale.configs`, so `vitscale demo` and the shipped presets work from an installed wheel.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["vitscale", "vitscale.*"]) + ["vitscale.kernels", "vitscale.configs"],
    package_dir={"vitscale.kernels": "kernels", "vitscale.configs": "configs"},
    package_data={"vitscale.configs": ["*.yaml", "*.json", "ablations/*.yaml"]},
    include_package_data=False,
)
