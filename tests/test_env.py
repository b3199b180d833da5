"""The ``PERCEIVERS_*`` switches: off, on, or the caller's default."""

import pytest

from perceivers._env import env_switch


@pytest.mark.parametrize(("value", "expected"), [
    ("0", False), ("false", False), (" OFF ", False), ("no", False),
    ("1", True), ("True", True), ("on", True), ("yes", True),
    ("auto", None), ("", None), (None, None),
])
def test_env_switch(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("PERCEIVERS_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("PERCEIVERS_TEST_SWITCH", value)
    assert env_switch("PERCEIVERS_TEST_SWITCH") is expected
