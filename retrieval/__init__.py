"""Serving-side library: ONNX embedder, preprocessing, FAISS gallery, metrics, evaluation, CLI.

Nothing in this package imports torch (tests/test_import_rules.py checks it).
Import the modules themselves, e.g. ``from retrieval.gallery import Gallery``,
so that a user of one light module (``retrieval.metrics``) does not load
FAISS and ONNX Runtime.
"""
