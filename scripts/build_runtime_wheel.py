"""Build the ``kiln-runtime`` wheel: kiln's runtime alone, as import name ``kiln_runtime`` (``make runtime-wheel``).

The wheel holds:

- ``kiln_runtime/*.py``: the files of ``runtime/`` as they are (they import each other relatively, so
  the same code is ``kiln.runtime`` in the full install and ``kiln_runtime`` here);
- ``kiln_runtime/lib/libtvm_runtime.so``: copied, not rebuilt, from the installed apache-tvm wheel
  (which must be the version ``pyproject.toml`` pins), with TVM's LICENSE and NOTICE;
- ``kiln_runtime/lib/kiln-pool-<hash>.so``: kiln's thread pool (``runtime/threads.py``) compiled
  here with the system C compiler, so the target machine needs none.

Its dependencies are ``pyproject.toml``'s pins of numpy, ml-dtypes (narrow dtypes) and apache-tvm-ffi;
cryptography is the extra ``kiln-runtime[cryptography]``: signatures are verified with OpenSSL's libcrypto
without it (``runtime/ed25519_openssl.py``), and 17 MB of cryptography + cffi would break the 25 MB budget.  The wheel is tagged ``py3-none-manylinux_2_N_<arch>``, N the newest glibc
symbol version the two shipped libraries need.  Nothing is downloaded: the build runs with this
interpreter's setuptools (``pip wheel --no-deps --no-build-isolation --no-index``).

    python scripts/build_runtime_wheel.py [--out dist]   # prints the wheel's path
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging" / "kiln-runtime"
RUNTIME_DEPENDENCIES = ("numpy", "ml-dtypes", "apache-tvm-ffi")


def _pins(project: dict) -> dict[str, str]:
    """The requirement strings of ``pyproject.toml``'s dependencies, by normalized distribution name."""
    out = {}
    for req in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
        out[re.sub(r"[-_.]+", "-", name).lower()] = req
    return out


def _tvm_runtime_library(pins: dict[str, str]) -> tuple[Path, Path]:
    """libtvm_runtime.so of the installed apache-tvm, checked to be the pinned version, and tvm's package folder."""
    want = pins["apache-tvm"].split("==", 1)[-1]
    have = importlib.metadata.version("apache-tvm")
    if have != want:
        raise SystemExit(f"apache-tvm {have} is installed, pyproject.toml pins {want}: install the pinned one")
    spec = importlib.util.find_spec("tvm")
    package = Path(spec.origin).parent
    lib = package / "lib" / "libtvm_runtime.so"
    if not lib.is_file():
        raise SystemExit(f"{lib}: not found in the apache-tvm install")
    return lib, package


def _glibc_needed(path: Path) -> tuple[int, int]:
    """The newest ``GLIBC_x.y`` symbol version named in a shared library (its version-needs strings)."""
    found = {(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", path.read_bytes())}
    return max(found, default=(2, 17))


def _platform_tag(libraries: list[Path]) -> str:
    major, minor = max(_glibc_needed(p) for p in libraries)
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def _render(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    if "@" in re.sub(r"#.*", "", template):
        raise SystemExit("packaging/kiln-runtime/pyproject.toml.in: a placeholder was left unfilled")
    return template


def stage(root: Path) -> Path:
    """Lay out the distribution's source tree under ``root``; returns it."""
    sys.path.insert(0, str(REPO))
    from kiln.runtime import threads

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins(project)
    package = root / "kiln_runtime"
    lib_dir = package / "lib"
    lib_dir.mkdir(parents=True)
    for src in sorted([*(REPO / "runtime").glob("*.py"), REPO / "runtime" / "pool.c"]):
        shutil.copy2(src, package / src.name)
    tvm_lib, tvm_package = _tvm_runtime_library(pins)
    shutil.copy2(tvm_lib, lib_dir / tvm_lib.name)
    for name in ("LICENSE", "NOTICE"):
        if (tvm_package / name).is_file():
            shutil.copy2(tvm_package / name, lib_dir / f"{name}.tvm")
    pool = lib_dir / threads.library_name()
    threads.build_library(pool)
    deps = ", ".join(f'"{pins[name]}"' for name in RUNTIME_DEPENDENCIES)
    (root / "pyproject.toml").write_text(_render((PACKAGING / "pyproject.toml.in").read_text(), {
        "VERSION": project["version"], "REQUIRES_PYTHON": project["requires-python"], "DEPENDENCIES": deps,
        "CRYPTOGRAPHY": f'"{pins["cryptography"]}"'}))
    for name in ("setup.py", "README.md"):
        shutil.copy2(PACKAGING / name, root / name)
    (root / "PLATFORM_TAG").write_text(_platform_tag([lib_dir / tvm_lib.name, pool]) + "\n")
    return root


def build(out: Path) -> Path:
    """Build the wheel into ``out`` (replacing an older kiln_runtime wheel of the same name); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-runtime-wheel-") as tmp:
        root = stage(Path(tmp) / "src")
        wheels = Path(tmp) / "wheels"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                               "--no-index", "--wheel-dir", str(wheels), str(root)],
                              capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (wheel,) = wheels.glob("kiln_runtime-*.whl")
        target = out / wheel.name
        shutil.copy2(wheel, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="folder for the wheel (default: dist/)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
