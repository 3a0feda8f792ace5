"""asrops shared core: settings, model registry, audio I/O, inference engines, evaluation.

`serve/`, `monitoring/` and `retrain/` build on this package; it imports none of them.
"""

__version__ = "0.1.0"
