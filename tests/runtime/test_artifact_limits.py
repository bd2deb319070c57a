"""Size limits on artifacts (issue 15 item 10, artifact side): zip bombs, huge npy headers, odd zip entries.

Sizes are checked from the zip directory before anything is inflated, and again
while inflating; an npy header is checked against the bytes present and
``tensor_bytes`` before its array is allocated.
"""

from __future__ import annotations

import io
import json
import os
import resource
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.runtime import ArtifactError, LimitError, Limits, load, read_artifact
from kiln.runtime.signing import local_private_key, signature_record

from .conftest import edit_manifest

MiB = 1 << 20


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _resigned(members: dict[str, bytes], **hashes: str) -> dict[str, bytes]:
    """``members`` with the manifest's member hashes updated and signed again with the local key."""
    manifest = json.loads(members["manifest.json"])
    manifest["members"].update({k.replace("_", "."): v for k, v in hashes.items()})
    members = {**members, "manifest.json": json.dumps(manifest).encode()}
    members["signature.json"] = json.dumps(signature_record(members["manifest.json"], local_private_key())).encode()
    return members


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _RepeatedZeros:
    """A deflate "compressor" for 4 MiB chunks of zeros: one fully flushed deflate segment of them, repeated
    (each segment stands alone after a full flush), then an empty final block. zipfile computes CRC and sizes."""

    def __init__(self) -> None:
        import zlib

        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.segment = c.compress(bytes(4 * MiB)) + c.flush(zlib.Z_FULL_FLUSH)

    def compress(self, data: bytes) -> bytes:
        assert len(data) == 4 * MiB and not any(data[:: 4096])
        return self.segment

    def flush(self) -> bytes:
        return b"\x03\x00"  # an empty final fixed-Huffman block


@pytest.fixture(scope="module")
def bomb(artifacts, tmp_path_factory) -> Path:
    """The issue's case, scaled: a ~1 MB artifact (signed, trusted) whose lib.so inflates to 1 GiB of zeros."""
    members = _resigned(_members(artifacts["static"].path), lib_so="0" * 64)
    path = tmp_path_factory.mktemp("bomb") / "bomb.kiln"
    zero = bytes(4 * MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if name != "lib.so":
                zf.writestr(name, data)
                continue
            info = zipfile.ZipInfo("lib.so")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                f._compressor = _RepeatedZeros()  # deflating 1 GiB takes seconds; its blocks repeat
                for _ in range(256):
                    f.write(zero)
    return path


def test_zip_bomb_is_refused_fast_and_small_by_load(bomb):
    assert bomb.stat().st_size < 3 * MiB
    with zipfile.ZipFile(bomb) as zf:
        assert zf.getinfo("lib.so").file_size == 1 << 30
    before_tmp = set(os.listdir(tempfile.gettempdir()))
    rss = _max_rss_mib()
    t0 = time.perf_counter()
    with pytest.raises(LimitError, match=r"bomb\.kiln: member lib\.so inflates [\d,]+ to 1,073,741,824 bytes; its "
                                         r"compression ratio is \d+x, over the limit zip_ratio=200x.*--max-zip-ratio"):
        load(bomb)
    assert time.perf_counter() - t0 < 1.0
    assert _max_rss_mib() - rss < 64
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before_tmp if n.startswith("kiln-lib")]
    with pytest.raises(LimitError, match=r"member lib\.so's inflated size is 1 GiB, over the limit "
                                         r"member_bytes=512 MiB.*--max-member-mb"):
        read_artifact(bomb, limits=Limits(zip_ratio=10_000, member_bytes=512 * MiB))
    with pytest.raises(LimitError, match=r"inflated size of its members together is 1 GiB, over the limit "
                                         r"artifact_bytes=100 MiB.*--max-artifact-mb"):
        read_artifact(bomb, limits=Limits(zip_ratio=10_000, artifact_bytes=100 * MiB))


def test_zip_bomb_is_refused_by_kiln_inspect_and_run(bomb, capsys):
    from kiln.cli import main

    t0 = time.perf_counter()
    assert main(["inspect", str(bomb)]) == 1
    assert main(["run", str(bomb)]) == 1
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err
    assert err.count("--max-zip-ratio") == 2 and "Traceback" not in err


def _npz_with_header(shape: tuple[int, ...], data: bytes) -> bytes:
    """A one-member npz whose .npy header claims ``shape`` (float32) over ``data``."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    header = header.ljust(118) + b"\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("w.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data)
    return buf.getvalue()


def test_npy_header_claiming_a_trillion_elements_is_refused_before_allocating(artifacts, tmp_path):
    import hashlib

    npz = _npz_with_header((10**12,), np.zeros(8, np.float32).tobytes())
    members = _resigned({**_members(artifacts["static"].path), "weights.npz": npz},
                        weights_npz=hashlib.sha256(npz).hexdigest())
    path = tmp_path / "huge.kiln"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    rss = _max_rss_mib()
    with pytest.raises(LimitError, match=r"weights\.npz: w\.npy \(<f4\[1000000000000\]\) is 3\.638 TiB|"
                                         r"weights\.npz: w\.npy \(<f4\[1000000000000\]\) is 3725 GiB"):
        load(path)
    with pytest.raises(ArtifactError, match=r"header claims <f4\[1000000000000\] = 4,000,000,000,000 bytes of "
                                            r"data, the member holds 32"):
        load(path, limits=Limits(tensor_bytes=1 << 60))
    assert _max_rss_mib() - rss < 64


def test_duplicate_and_inconsistent_zip_entries(artifacts, tmp_path):
    members = _members(artifacts["static"].path)
    path = tmp_path / "dup.kiln"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zf.writestr("lib.so", b"second copy")
    with pytest.raises(ArtifactError, match=r"member lib\.so appears twice"):
        read_artifact(path)
    data = bytearray(artifacts["static"].path.read_bytes())
    with zipfile.ZipFile(artifacts["static"].path) as zf:
        entry = data.find(b"model.ir", zf.start_dir) - 46  # model.ir's central directory entry
    assert data[entry:entry + 4] == b"PK\x01\x02"
    data[entry + 10:entry + 12] = (12).to_bytes(2, "little")  # say bzip2
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"member model\.ir uses zip compression method 12"):
        read_artifact(path)


def test_tensors_past_tensor_bytes_are_refused_at_load(artifacts, monkeypatch, tmp_path):
    """A run's inputs and outputs have sizes known at load: past ``tensor_bytes``, refused before dlopen."""
    monkeypatch.setattr("kiln.runtime.session._load_library", lambda *a: pytest.fail("library loaded"))
    with pytest.raises(LimitError, match=r"input 'x' \(float32\[2, 8\]\) is 64 bytes, over the limit "
                                         r"tensor_bytes=32 bytes.*--max-tensor-mb"):
        load(artifacts["static"].path, limits=Limits(tensor_bytes=32))
    path = tmp_path / "big-output.kiln"
    edit_manifest(artifacts["static"].path, path, lambda m: m["outputs"][1].update(shape=[2, "4096*N"]) or
                  m.update(symbols={"N": 1024}))
    with pytest.raises(LimitError, match=r"output 'relu' \(float32\[2, '4096\*N'\]\) is 32 MiB, over the "
                                         r"limit tensor_bytes=1 MiB"):
        load(path, limits=Limits(tensor_bytes=MiB))


def test_limit_errors_are_kiln_errors():
    assert issubclass(LimitError, kiln.Error)
