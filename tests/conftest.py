"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def single_thread_faiss():
    """k-means on a tiny sample is dominated by OpenMP start-up and spinning on a busy 2-core machine."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
