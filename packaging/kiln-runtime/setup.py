"""Tags the kiln-runtime wheel ``py3-none-<platform>``: it ships native libraries but no CPython extension.

The platform tag is the one ``scripts/build_runtime_wheel.py`` computed from the glibc versions the
shipped libraries need (file ``PLATFORM_TAG`` beside this one).
"""

from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel

PLATFORM = (Path(__file__).parent / "PLATFORM_TAG").read_text().strip()


class BinaryDistribution(Distribution):
    """Holds native code: the wheel is platlib (installed as one folder), not pure Python."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """A wheel for one platform, any Python 3 (the libraries are loaded with ctypes, not imported)."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", PLATFORM


setup(distclass=BinaryDistribution, cmdclass={"bdist_wheel": PlatformWheel})
