"""asrops shared core: settings, the model registry, audio I/O, features, inference engines,
evaluation, the production log and feedback store formats.

promotion/, monitoring/, serve/, retrain/ and cli/ (installed as `asrops.promotion`, ...) build
on this package; it imports none of them (tests/test_layout.py keeps it so).
"""

__version__ = "0.1.0"
