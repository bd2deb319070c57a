"""Session-wide test setup: a private ``KILN_HOME`` so tests never touch the user's signing key."""

from __future__ import annotations

import signal
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def kiln_home(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A private ``KILN_HOME`` (local signing key) and no ``KILN_TRUSTED_KEYS`` for the whole session."""
    home = tmp_path_factory.mktemp("kiln-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(home))
        mp.delenv("KILN_TRUSTED_KEYS", raising=False)
        yield home


@pytest.fixture
def default_sigint() -> Any:
    """SIGINT as Python installs it (KeyboardInterrupt), whatever the runner inherited: a shell starts
    background jobs (``make test &``) with SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
