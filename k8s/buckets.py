"""The S3 buckets the settings name, created when missing: a fresh object store (the local
overlay's MinIO) has none, and neither the registry nor the production log creates its bucket
(on AWS the bucket, its policy and its lifecycle are the operator's, k8s/README.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from asrops.registry.store import S3Store, open_store
from asrops.settings import Settings

log = logging.getLogger(__name__)


def s3_stores(settings: Settings) -> list[S3Store]:
    """One store per distinct (bucket, endpoint) among the registry and the production log."""
    stores: dict[tuple[str, str | None], S3Store] = {}
    for uri, endpoint in ((settings.registry_uri, settings.registry.s3_endpoint_url),
                          (settings.production_log_uri, settings.monitoring.production_log.s3_endpoint_url)):
        store = open_store(uri, endpoint, settings.registry.s3_region)
        if isinstance(store, S3Store):
            stores.setdefault((store.bucket, endpoint), store)
    return list(stores.values())


def ensure_buckets(settings: Settings, timeout_s: float = 300.0, say: Callable[[str], None] = log.info) -> list[str]:
    """Create each missing bucket; returns the buckets created. An object store that does not
    answer yet (MinIO starting beside us) is retried until `timeout_s`."""
    from botocore.exceptions import BotoCoreError, ClientError

    region = settings.registry.s3_region  # AWS wants a location outside us-east-1; MinIO takes any
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    created = []
    deadline = time.monotonic() + timeout_s
    for store in s3_stores(settings):
        while True:
            try:
                store.client.head_bucket(Bucket=store.bucket)
                say(f"bucket {store.bucket} exists")
                break
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                store.client.create_bucket(Bucket=store.bucket, **location)
                say(f"bucket {store.bucket} created")
                created.append(store.bucket)
                break
            except BotoCoreError as exc:  # not reachable yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the object store of bucket {store.bucket} did not answer within "
                                       f"{timeout_s:.0f} s: {exc}") from exc
                say(f"waiting for the object store of bucket {store.bucket}: {exc}")
                time.sleep(2)
    return created
