"""pytest setup for the benchmark files (bench_*.py): collected when this folder or a file in it is named on the
command line (`python -m pytest benchmarks`); `python -m pytest tests` never sees them."""

import pytest


def pytest_collect_file(file_path, parent):
    # pytest collects test_*.py by default; the benchmark files are bench_*.py so the test run leaves them alone.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
