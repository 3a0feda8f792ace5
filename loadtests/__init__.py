"""Load tests and the service benchmark of asrops against a one-request-at-a-time peer."""
