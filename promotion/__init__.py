"""Promotion: a canary is stepped up, promoted or rolled back on live Prometheus metrics.

- checks.py: the PromQL it asks (request counts and the built-in checks);
- analysis.py: the judgement of one interval against the spec (`AnalysisSpec` in settings);
- state.py: the rollout's phases and the controller's record in the registry;
- rollout.py: the operations (deploy canary, traffic, promote, roll back, pause, resume,
  abort), each a compare-and-swap with an audit entry, shared with operators and retrains;
- controller.py and metrics.py: the long-running controller and what it exports.
"""
