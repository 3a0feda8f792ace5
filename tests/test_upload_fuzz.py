"""The upload fuzzer (loadtests/upload_fuzz.py) for a few hundred cases against the in-process
API: mutated WAV/FLAC/MP3/Ogg/WebM files and multipart framing get a 2xx or a 4xx in the
OpenAI shape, never a 5xx, and a good request is answered afterwards. The benchmark runs the
same strategies for 2,000 cases through Ray's proxy."""

from __future__ import annotations

from fastapi.testclient import TestClient

from asrops.serve.api import build_api
from asrops.settings import Settings
from loadtests.upload_fuzz import ENDPOINT, Upload, fuzz, problem, seed_files
from tests.test_api import FakeTranscriber


def test_mutated_uploads_get_2xx_or_a_4xx_in_the_openai_shape_never_a_5xx():
    client = TestClient(build_api(FakeTranscriber(), Settings(data_dir="/nonexistent")), raise_server_exceptions=False)
    seeds = seed_files()

    def send(upload: Upload):
        headers = {"Content-Type": upload.content_type} if upload.content_type else {}
        r = client.post(ENDPOINT, content=upload.body, headers=headers)
        return r.status_code, dict(r.headers), r.content

    statuses = fuzz(send, seeds, cases=300)
    assert sum(statuses.values()) >= 300 and {"200"} < set(statuses), statuses  # both kinds were reached
    for fmt, audio in seeds.items():  # every seed is a valid upload on its own
        r = client.post(ENDPOINT, files={"file": (f"clip.{fmt}", audio)})
        assert r.status_code == 200, (fmt, r.text)


def test_the_judge_refuses_5xx_and_errors_outside_the_openai_shape():
    assert problem(500, {}, b'{"error": {"message": "x", "type": "server_error"}}')
    assert problem(400, {}, b"Bad Request")
    assert problem(422, {}, b'{"detail": []}')
    assert problem(400, {}, b'{"error": {"message": "", "type": "invalid_request_error"}}')
    assert problem(413, {}, b'{"error": {"message": "too big", "type": "invalid_request_error"}}') is None
