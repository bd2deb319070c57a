"""kiln's error taxonomy: everything the public API raises for bad input is a :class:`Error`.

The runtime is the bottom layer (it ships alone, without the compiler), so the
base classes live here and every stage derives its own errors from them:
``FrontendError``, ``PipelineError``, ``CompileError``, ``CodegenError`` ... are
all ``kiln.Error``. An API caller catches ``kiln.Error`` and sees every refusal;
anything else that escapes is a kiln bug.
"""

from __future__ import annotations

__all__ = ["ArtifactError", "Error", "InputError", "LimitError", "TrustError", "caused_by_interrupt"]


class Error(Exception):
    """Base of every error kiln raises for bad or unsupported input; the message says what and why."""


class InputError(Error, ValueError):
    """Run inputs that do not match a model's signature: the message names the input, expected and got."""


class ArtifactError(Error):
    """An artifact file that cannot be used; the message names the file and what is wrong."""


class TrustError(ArtifactError):
    """An artifact whose signature is missing, wrong, or by a key that is not trusted."""


class LimitError(Error):
    """Input past one of kiln's size limits; the message names the limit, its value and the flag."""


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``error``'s cause/context chain or named in its message (TVM and
    torch's exporter catch Ctrl-C and raise their own error, which must not read as a failure)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False
