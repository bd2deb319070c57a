"""``kiln compile --bundle DIR``: a self-contained folder that runs an artifact from C++.

The folder holds the artifact, kiln's C++ runtime prebuilt (``lib/libkiln_runtime.so``, OpenSSL's
libcrypto and zlib linked in statically when their archives exist, so the target needs no -dev
packages) with the two TVM libraries it loads (``libtvm_runtime.so``, ``libtvm_ffi.so``; the
runtime finds them beside itself: rpath ``$ORIGIN``), the header (``include/kiln/runtime.hpp``
and ``include/dlpack/dlpack.h``), the example ``main.cpp``, a ``CMakeLists.txt`` that builds it
with nothing but a C++17 compiler and CMake, the signer's public key (``signer.pub``) when this
machine trusts the artifact, and ``README.txt`` with the two commands. Nothing in it points back
into this repository or its virtual environment.

The runtime library is built once per source version with CMake from ``cpp/`` and cached in
``$KILN_CACHE_DIR`` (default ``~/.cache/kiln``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from kiln.runtime.artifact import read_artifact
from kiln.runtime.errors import Error

__all__ = ["BundleError", "build_runtime_library", "cpp_source_dir", "write_bundle"]

_BUNDLE_CMAKE = """\
# Builds the kiln C++ example against the prebuilt runtime in lib/ (a C++17 compiler and CMake only).
cmake_minimum_required(VERSION 3.13)
project(kiln_example CXX)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()
add_executable(kiln_example main.cpp)
target_include_directories(kiln_example PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include)
target_link_libraries(kiln_example PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/lib/libkiln_runtime.so)
set_target_properties(kiln_example PROPERTIES BUILD_RPATH ${CMAKE_CURRENT_SOURCE_DIR}/lib
                      INSTALL_RPATH "$ORIGIN/../lib")
"""

_README = """\
kiln C++ bundle: {artifact} and kiln's C++ runtime, ready to build with a C++17 compiler and CMake.

  cmake -S . -B build && cmake --build build
  ./build/kiln_example {artifact}{trust}

The example prints the model's outputs for deterministic inputs (see main.cpp; --input NAME=FILE.npy
gives real ones, --out DIR writes the outputs as .npy). Your own program includes
include/kiln/runtime.hpp and links lib/libkiln_runtime.so (which finds libtvm_runtime.so and
libtvm_ffi.so beside itself):

  kiln::Session s = kiln::load("{artifact}", options);
  kiln::Outputs out = s.run({{{{"{first_input}", dl_tensor}}}});

{trust_note}
"""


class BundleError(Error):
    """A bundle that cannot be written: no CMake or compiler, a failed runtime build, a bad folder."""


def cpp_source_dir() -> Path:
    """The C++ runtime's sources (``cpp/`` of the repository kiln runs from)."""
    root = Path(__file__).resolve().parent.parent / "cpp"
    if not (root / "CMakeLists.txt").is_file():
        raise BundleError(f"kiln's C++ runtime sources are not at {root}: --bundle needs a source checkout of kiln")
    return root


def _package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (importing tvm costs seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"package {name} is not installed; the C++ runtime links its libraries")
    return Path(list(spec.submodule_search_locations)[0])


def _tvm_paths() -> tuple[Path, Path]:
    """tvm_ffi's package folder (include/, lib/libtvm_ffi.so) and the folder of libtvm_runtime.so."""
    ffi, tvm_lib = _package_dir("tvm_ffi"), _package_dir("tvm") / "lib"
    for need in (ffi / "include" / "tvm" / "ffi" / "c_api.h", ffi / "lib" / "libtvm_ffi.so",
                 tvm_lib / "libtvm_runtime.so"):
        if not need.is_file():
            raise BundleError(f"{need} is missing: the C++ runtime builds against it")
    return ffi, tvm_lib


def _source_digest(src: Path, ffi: Path, tvm_lib: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "build" not in p.relative_to(src).parts):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(b"pool.c\0" + (src.parent / "runtime" / "pool.c").read_bytes())  # the pool CMake compiles
    for lib in (ffi / "lib" / "libtvm_ffi.so", tvm_lib / "libtvm_runtime.so"):
        st = lib.stat()
        h.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    log.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        raise BundleError(f"{' '.join(cmd[:3])} ... failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")


def build_runtime_library(cache_dir: str | os.PathLike | None = None) -> Path:
    """``libkiln_runtime.so`` built for bundles (rpath ``$ORIGIN`` only), from the cache when up to date."""
    if shutil.which("cmake") is None:
        raise BundleError("cmake is not on PATH: it builds kiln's C++ runtime for the bundle")
    src = cpp_source_dir()
    ffi, tvm_lib = _tvm_paths()
    cache = Path(cache_dir or os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")
    target = cache / f"cpp-runtime-{_source_digest(src, ffi, tvm_lib)}" / "libkiln_runtime.so"
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".cpp-build-") as build:
        _run(["cmake", "-S", str(src), "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DKILN_ORIGIN_RPATH=ON",
              f"-DKILN_TVM_FFI_DIR={ffi}", f"-DKILN_TVM_LIB_DIR={tvm_lib}"], log)
        _run(["cmake", "--build", build, "--target", "kiln_runtime", "-j", str(min(4, os.cpu_count() or 1))], log)
        staged = Path(build) / "stage"
        staged.mkdir()
        shutil.copy2(Path(build) / "libkiln_runtime.so", staged / "libkiln_runtime.so")
        (staged / "build.log").write_text("\n".join(log))
        try:
            os.replace(staged, target.parent)
        except OSError:
            if not target.is_file():  # another process won the race: its build is as good
                raise
    return target


def _checked(artifact: Path) -> tuple[dict, bytes | None]:
    """The artifact's manifest (fully checked, unsigned accepted) and the PEM public key that signed it
    when this machine trusts that key (None: unsigned or untrusted)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    contents = read_artifact(artifact, allow_unsigned=True)
    if contents.trust is None or not contents.trust.trusted:
        return contents.manifest, None
    with zipfile.ZipFile(artifact) as zf:
        record = json.loads(zf.read("signature.json"))
    key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(record["public_key"]))
    return contents.manifest, key.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)


def write_bundle(artifact_path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Write the C++ bundle of ``artifact_path`` into ``directory`` (created; must be empty if it exists).

    The artifact is checked first (the Python runtime's checks, unsigned accepted); when this machine
    trusts its signer, that public key goes in as ``signer.pub`` and the README's command trusts it.
    Returns the folder.
    """
    artifact = Path(artifact_path)
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: exists and is not an empty folder; choose a new one for the bundle")
    manifest, signer = _checked(artifact)
    library = build_runtime_library()
    ffi, tvm_lib = _tvm_paths()
    src = cpp_source_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "lib").mkdir()
    (out / "include" / "kiln").mkdir(parents=True)
    (out / "include" / "dlpack").mkdir()
    shutil.copy2(artifact, out / artifact.name)
    shutil.copy2(library, out / "lib" / "libkiln_runtime.so")
    shutil.copy2(tvm_lib / "libtvm_runtime.so", out / "lib" / "libtvm_runtime.so")
    shutil.copy2(ffi / "lib" / "libtvm_ffi.so", out / "lib" / "libtvm_ffi.so")
    shutil.copy2(src / "include" / "kiln" / "runtime.hpp", out / "include" / "kiln" / "runtime.hpp")
    shutil.copy2(ffi / "include" / "dlpack" / "dlpack.h", out / "include" / "dlpack" / "dlpack.h")
    shutil.copy2(src / "examples" / "main.cpp", out / "main.cpp")
    (out / "CMakeLists.txt").write_text(_BUNDLE_CMAKE)
    if signer is not None:
        (out / "signer.pub").write_bytes(signer)
        trust, note = " --trust signer.pub", (
            "signer.pub is the public key that signed the artifact, trusted where the bundle was made. In\n"
            "production, install that key on the target out of band (KILN_TRUSTED_KEYS, --trust) rather than\n"
            "trusting a key that travels with the file it vouches for.")
    else:
        trust, note = " --allow-unsigned", (
            "The artifact is unsigned or signed by a key the bundling machine does not trust, so the\n"
            "command above loads it with --allow-unsigned: only do that for a file you trust.")
    first = manifest["inputs"][0]["name"] if manifest["inputs"] else "x"
    (out / "README.txt").write_text(_README.format(artifact=artifact.name, trust=trust, trust_note=note,
                                                   first_input=first))
    return out
