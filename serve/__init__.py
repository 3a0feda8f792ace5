"""The Ray Serve application (installed as `asrops.serve`): an OpenAI-compatible ingress and one
model deployment per registry version.

- api.py: the HTTP layer (FastAPI app factory, auth, limits, the OpenAI error shape: errors.py);
- ingress.py: the ingress deployment: routing (routing.py), breakers (breaker.py), fallback,
  shadowing, telemetry (telemetry.py, metrics.py), feedback (feedback.py), admin API (admin.py);
- model_server.py and lanes.py: the model deployment of one version, batching over engine lanes;
- launcher.py: deploying the applications on a local Ray (what `asrops serve` uses);
- ray_shims.py: changes to Ray Serve (replicas on loopback only, backpressure on bodies in the
  replica and the proxy, a client port for the ingress only).
"""

from asrops.serve.ray_shims import install_in_replica

install_in_replica()  # in every replica's process, before it serves
