"""Locust user that POSTs the core English clips (as in `loadtests.service_bench`) to
/v1/audio/transcriptions, back to back, for open-ended load tests and Locust's web UI:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s

LOADTEST_CLIPS sets how many clips are used (default 40).
"""

from __future__ import annotations

import itertools
import os
import sys
from functools import cache
from pathlib import Path

from locust import HttpUser, constant, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # locust imports this file by path
from loadtests.service_bench import ENDPOINT, Clip, load_clips

_next_index = itertools.count()


@cache
def clips() -> list[Clip]:
    """Loaded once per process, on first use (so `locust --help` does not decode audio)."""
    return load_clips(int(os.environ.get("LOADTEST_CLIPS", "40")))


class TranscriptionUser(HttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the last is answered

    @task
    def transcribe(self) -> None:
        clip = clips()[next(_next_index) % len(clips())]  # round-robin across all users
        with self.client.post(
            ENDPOINT,
            files={"file": (clip.name, clip.wav, "audio/wav")},
            data={"model": "whisper-1", "response_format": "json"},
            name=ENDPOINT,
            catch_response=True,
        ) as response:
            if response.status_code == 200 and "text" not in response.json():
                response.failure("200 without a 'text' field")
