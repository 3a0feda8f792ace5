"""The Ray Serve application: an OpenAI-compatible ingress and one model deployment per
registry version."""
