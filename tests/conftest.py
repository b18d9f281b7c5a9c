from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import LogRecorder, ProcessTracker, safe_dir  # noqa: E402

from plugin_launcher import PluginLauncher  # noqa: E402


@pytest.fixture
def tracker() -> Iterator[ProcessTracker]:
    """Records PIDs; kills any still alive after the test (the test should already have)."""
    t = ProcessTracker()
    yield t
    t.cleanup()


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """An empty plugin folder that passes the permission check."""
    return safe_dir(tmp_path / "plugins")


@pytest.fixture
def launchers() -> Iterator[list[PluginLauncher]]:
    """Append launchers here; every one is stopped at teardown even if the test failed."""
    made: list[PluginLauncher] = []
    yield made
    for launcher in made:
        launcher.stop_plugins(timeout=1.0)


@pytest.fixture
def logs() -> Iterator[LogRecorder]:
    """Records every message of the ``plugin_launcher`` loggers at INFO and above."""
    logger = logging.getLogger("plugin_launcher")
    recorder = LogRecorder()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)
    logger.setLevel(old_level)
