"""The bottom layer: plain helpers every other package may use (standard library and numpy only).

No torch, FAISS, ONNX Runtime or Flask here (tests/test_import_rules.py checks it), so that resolving a
training config or parsing a command line never loads them. Import the modules themselves, e.g.
``from core.errors import UserError``.
"""
