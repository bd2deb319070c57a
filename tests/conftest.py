"""Session-wide test setup: a private ``KILN_HOME`` so tests never touch the user's signing key."""

from __future__ import annotations

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
