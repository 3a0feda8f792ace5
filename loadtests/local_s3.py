"""A local S3 (moto's standalone server, a separate process speaking HTTP on 127.0.0.1) for the
benchmarks and the test suite: the S3 paths run against a real endpoint, never AWS.

`python -m loadtests.local_s3 -H 127.0.0.1 -p PORT` runs moto's server with one correction:
S3 checks a conditional write's precondition (If-Match, If-None-Match) atomically with the
write, while moto checks and then writes, so two concurrent compare-and-swap writes through its
threaded server could both succeed (a lost update the registry's CAS relies on S3 to prevent;
it made a concurrency test fail about once in fifty runs). One lock around moto's object writes
and deletes makes it as strict as S3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class MotoServer:
    """A moto S3 server on 127.0.0.1 that can be paused (SIGSTOP: connections hang, as when a
    store is unreachable) and resumed with its data."""

    def __init__(self, bucket: str | None = None):
        """Started and answering on return; with `bucket`, that bucket exists (it needs
        LOCAL_S3_CREDENTIALS, or any, in the environment)."""
        from loadtests.service_bench import free_port

        self.port, self.bucket = free_port(), bucket
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtests.local_s3", "-H", "127.0.0.1", "-p",
                                      str(self.port)], cwd=Path(__file__).resolve().parent.parent,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start on {self.url} (exit code {self.proc.poll()})") from None
                time.sleep(0.1)
        if bucket:
            import boto3

            boto3.client("s3", endpoint_url=self.url, region_name="us-east-1").create_bucket(Bucket=bucket)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()


LOCAL_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
"""moto accepts any; set so that boto3 never looks for real ones."""


def atomic_conditional_writes() -> None:
    """Serialise moto's object writes and deletes, so that a precondition and its write are one step."""
    import threading

    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        method = getattr(S3Response, name)

        def locked(self, *args, _method=method, **kwargs):
            with lock:
                return _method(self, *args, **kwargs)

        setattr(S3Response, name, locked)


if __name__ == "__main__":
    from moto.server import main

    atomic_conditional_writes()
    main()
