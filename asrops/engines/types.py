"""What crosses the engine boundary: decode options in, transcriptions out."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DecodeOptions(BaseModel):
    """How to decode one request. Requests in one batch share identical options."""

    beam_size: int = Field(default=1, ge=1, le=16)
    """1 is greedy decoding."""
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    """0 decodes deterministically (greedy or beam search); above 0 samples one candidate, seeded by the window's own
    audio, so that the same audio gets the same text whatever it is batched with."""
    temperature_increment: float | None = Field(default=0.2, gt=0.0, le=1.0)
    """Temperature fallback, as openai/whisper: a window whose text loops (gzip compression ratio
    above 2.4) or whose average log-probability is below -1.0 is decoded again at `temperature`
    plus this, then plus twice this, ... up to 1.0, until it passes (a silent window never
    retries); the last try is kept. None turns it off."""
    prompt: str | None = None
    """Initial prompt: previous text or domain vocabulary that biases decoding."""
    timestamps: bool = True
    """Decode Whisper's timestamp tokens so segments carry real start/end times."""
    max_new_tokens: int = Field(default=224, ge=1, le=448)
    word_timestamps: bool = False
    """Time every word (an alignment pass over the decoded text; see engines/alignment.py)."""


class Word(BaseModel):
    word: str
    start: float
    """Seconds from the start of the audio."""
    end: float
    probability: float
    """Mean probability of the word's tokens: low means the model was unsure of it."""


class Segment(BaseModel):
    """One decoded stretch of speech with Whisper's own quality signals."""

    id: int
    start: float
    """Seconds from the start of the audio."""
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    """Mean log-probability of the segment's tokens (Whisper flags < -1.0 as doubtful)."""
    no_speech_prob: float
    """Probability of the no-speech token at the start of the window."""
    compression_ratio: float
    """gzip ratio of the text; > 2.4 means repetitive, likely hallucinated."""
    temperature: float = 0.0
    """The temperature its window was decoded at (above the request's after a fallback)."""
    words: list[Word] | None = None
    """Its words with their times, when word timestamps were asked for."""
    token_probs: list[float] | None = None
    """Probability of each of `tokens` when it was decoded (the model's confidence in it)."""
    word_probs: list[float] | None = None
    """Per word (punctuation aside): the mean of its tokens' probabilities. Low means unsure: the
    production log's share of low-confidence words comes from these."""


class Transcription(BaseModel):
    text: str
    segments: list[Segment]
    language: str = "en"
    duration_s: float
    """Duration of the input audio in seconds."""

    @property
    def words(self) -> list[Word] | None:
        """Every segment's words in order; None when word timestamps were not asked for."""
        if not self.segments or self.segments[0].words is None:
            return None if self.segments else []
        return [w for s in self.segments for w in s.words or []]
