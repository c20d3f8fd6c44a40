"""imta_fast/data/errors.py: the exception type and path quoting used in every message."""
from pathlib import Path

from imta_fast.data.errors import DataError, describe


def test_data_error_is_a_plain_exception_with_a_one_line_message():
    err = DataError(f"dataset folder not found: {describe(Path('/no such/dir'))}")
    assert isinstance(err, Exception) and not isinstance(err, (OSError, ValueError))
    assert str(err) == "dataset folder not found: '/no such/dir'"
    assert "\n" not in str(err)
