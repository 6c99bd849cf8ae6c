"""Serving-side library: ONNX embedder, preprocessing, FAISS gallery, metrics, evaluation, CLI.

Nothing in this package imports torch (tests/test_import_rules.py checks it).
Import the modules themselves, e.g. ``from retrieval.gallery import Gallery``,
so that light users (training imports ``retrieval.atomic``) do not load FAISS
and ONNX Runtime.
"""
