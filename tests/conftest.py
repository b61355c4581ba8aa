"""Fixtures shared by several test modules."""

from __future__ import annotations

import logging

import pytest


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
