"""Test isolation: every test session gets its own DENSECL_BENCH_HOME (demo data, feature cache)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def bench_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("densecl_bench_home")
    old = os.environ.get("DENSECL_BENCH_HOME")
    os.environ["DENSECL_BENCH_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DENSECL_BENCH_HOME", None)
    else:
        os.environ["DENSECL_BENCH_HOME"] = old


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: bit-level comparisons that must not depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
