"""asrops on Kubernetes (KubeRay): the generator of the manifests' code-derived parts and the
rendering of an overlay (render.py), and the bucket set-up of the local overlay (buckets.py).
The manifests themselves are the YAML beside this package (k8s/README.md)."""
