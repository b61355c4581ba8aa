"""Fixtures shared by several test modules, and the share of the cores each pytest-xdist worker takes."""

from __future__ import annotations

import logging
import os

import pytest

MAX_WORKERS = 4  # each worker loads its own tiny pipelines and servers (about 1 GB)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    """In a worker, torch (and what a test starts: notebook kernels, the command-line app) uses the worker's share
    of the cores, not all of them in every worker (two workers on two cores would each start two threads)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = share


@pytest.fixture(scope="module")
def smoke_session(tmp_path_factory: pytest.TempPathFactory):
    """A pipeline on tiny random smoke weights, one per test module (a module's tests may change its LoRAs)."""
    from instantid_colab import pipeline, smoke

    return pipeline.load_pipeline(smoke.build_smoke_weights(tmp_path_factory.mktemp("smoke")), progress=False)


@pytest.fixture
def diffusers_said():
    """The messages diffusers logs during the test (its loggers stop propagating at "diffusers": caplog misses them)."""
    said: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(listener)
    yield said
    logging.getLogger("diffusers").removeHandler(listener)
