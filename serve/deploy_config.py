"""asrops as a Serve deploy config (the `serve deploy` / `serve run` schema), built in one place:
k8s/render.py writes it to serve/serve_config.yaml (for `asrops serve --config`) and into the
RayService's serveConfigV2, so the local run and the cluster deploy the same applications."""

from __future__ import annotations

from asrops.settings import ServeSettings


def serve_deploy_config() -> dict:
    """The stable version's model application and the OpenAI-compatible ingress, through the
    same builders `asrops serve` uses (their import paths taken from the builders themselves, so
    a rename cannot leave a config stale). Settings come from ASROPS_* env vars in every Ray
    process. The proxy listens on every interface: on a cluster the client-facing Service
    reaches it there."""
    from asrops.serve.ingress import build_ingress_app
    from asrops.serve.launcher import INGRESS_APP
    from asrops.serve.model_server import build_model_app, model_app_name

    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": ServeSettings().port},
        "applications": [
            {
                # One application per model version; the ingress asks each `model-*` application
                # which version it serves, so the name need not be the version id.
                "name": model_app_name("stable"),
                "import_path": f"{build_model_app.__module__}:{build_model_app.__name__}",
                "route_prefix": None,  # reached through the ingress only
                "args": {"version": "stable"},  # an alias or a version id, resolved at deploy time
            },
            {
                "name": INGRESS_APP,
                "import_path": f"{build_ingress_app.__module__}:{build_ingress_app.__name__}",
                "route_prefix": "/",
            },
        ],
    }
