"""The test suite: a package, so test modules import each other's helpers as ``tests.<module>`` and the
shared synthetic inputs as ``benchmarks.fixtures``."""
