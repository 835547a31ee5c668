import pytest

from helpers import save_tiny_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A tiny random toy teacher on disk, one per test module."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")))
