"""The PEER of the service benchmark: faster-whisper int8 (the same Whisper tiny.en files) behind
the same `POST /v1/audio/transcriptions`, answering ONE request at a time.

That is how single-model servers such as speaches and whisper.cpp's server work (one lock around
the whole request), so it is the baseline our batching service has to beat under concurrency.

    python -m loadtests.peer_server --port 8100 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

from asrops.audio import decode_audio
from asrops.errors import AudioError

TranscribeFn = Callable[[np.ndarray], str]
"""16 kHz mono float32 samples -> text."""


def build_app(transcribe: TranscribeFn) -> FastAPI:
    """The HTTP app around any `transcribe` (a fake one in tests)."""
    app = FastAPI(title="asrops-peer")
    lock = asyncio.Lock()  # one request at a time, decoding included (as whisper.cpp's server)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()] = "whisper-1",  # accepted like OpenAI's API, ignored
        response_format: Annotated[str, Form()] = "json",
    ):
        data = await file.read()
        async with lock:
            try:
                audio = await asyncio.to_thread(decode_audio, data)
            except AudioError as exc:
                return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, 400)
            text = await asyncio.to_thread(transcribe, audio.samples)
        return {"text": text}

    return app


def faster_whisper_transcriber(threads: int = 2) -> TranscribeFn:
    """faster-whisper int8 on the embedded CTranslate2 tiny.en, decoding like our service
    (greedy, temperature 0, English, no conditioning on previous text)."""
    from faster_whisper import WhisperModel

    from asrops.models.ct2_import import embedded_ct2_dir

    model = WhisperModel(str(embedded_ct2_dir()), device="cpu", compute_type="int8", cpu_threads=threads)

    def transcribe(samples: np.ndarray) -> str:
        segments, _ = model.transcribe(
            samples, beam_size=1, temperature=0.0, language="en", condition_on_previous_text=False
        )
        return "".join(s.text for s in segments).strip()

    return transcribe


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=2, help="CTranslate2 intra-op threads")
    args = parser.parse_args()
    app = build_app(faster_whisper_transcriber(args.threads))  # loaded before /healthz answers
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
