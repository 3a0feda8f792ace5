"""Labelled synthetic speech on demand: a `SynthSpec` in, `audio/<id>.wav` and `manifest.jsonl`
out, for load tests, drift scenarios (accent + noise shift) and retraining tests.

Everything follows from the spec: clip i draws its text, rate and noise from a generator seeded
with (seed, i), so a clip does not depend on how many others there are or which thread made it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from asrops.audio import SAMPLE_RATE, audio_to_wav_bytes
from asrops.clip_manifest import write_rows
from asrops.synth import effects
from asrops.synth.text import DOMAINS, POOLS, Domain, TextPool, templates_for
from asrops.synth.voices import ACCENTS, CATALOGUE, Voice, installed_voices, synthesize

TTS_WORKERS = 2
PROGRESS_EVERY = 25


class SynthSpec(BaseModel):
    """What to generate. Voices and accents filter the catalogue (both must match)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=100, ge=1, le=100_000)
    voices: list[str] | Literal["all"] = ["en-us"]
    """Catalogue voice names (`asrops.synth.voices.CATALOGUE`), or "all" installed ones."""
    accents: list[str] | None = None
    """Keep only voices with these accents; None keeps every selected voice."""
    rate: tuple[int, int] = (160, 190)
    """Speaking rate range in words per minute, drawn uniformly per clip (espeak-ng `-s`;
    flite gets duration_stretch = 175 / rate)."""
    snr_db: float | None = None
    """Noise level as speech-to-noise ratio (active speech only); None is clean."""
    noise: effects.NoiseKind = "white"
    reverb_rt60_s: float | None = Field(default=None, gt=0, le=3)
    """Synthetic room reverberation time; None is dry."""
    telephone: bool = False
    """300-3400 Hz, 8 kHz channel, applied after noise (the SNR is the one at the microphone)."""
    mulaw: bool = True
    """With `telephone`: add G.711 mu-law quantisation."""
    domains: list[Domain] = list(DOMAINS)
    seed: int = 0
    template_ids: list[str] | None = None
    """Only these templates (see `split_templates`); None allows all of the domains'."""
    text: TextPool = "templates"
    """What is spoken: the templates; "unseen", the sentences written to judge generalisation
    (`text.UNSEEN`: in no template), a set of some acoustics over text no retrain has seen; or
    "broad", everyday sentences in neither (`text.BROAD`), to train on some acoustics without
    teaching a sentence shape."""

    @field_validator("voices")
    @classmethod
    def _known_voices(cls, v):
        unknown = [] if v == "all" else [x for x in v if x not in CATALOGUE]
        if unknown or not v:
            raise ValueError(f"unknown voices {unknown}; choose from {', '.join(CATALOGUE)}")
        return v

    @field_validator("accents")
    @classmethod
    def _known_accents(cls, v):
        if v is not None and (not v or set(v) - set(ACCENTS)):
            unknown = sorted(set(v) - set(ACCENTS))
            raise ValueError(f"unknown accents {unknown}; choose from {', '.join(ACCENTS)}")
        return v

    @field_validator("rate")
    @classmethod
    def _rate_range(cls, v):
        if not 80 <= v[0] <= v[1] <= 450:
            raise ValueError("rate must be LOW-HIGH words per minute, 80 <= LOW <= HIGH <= 450")
        return v

    @model_validator(mode="after")
    def _templates_exist(self):
        if self.template_ids is not None:
            unknown = sorted(set(self.template_ids) - set(POOLS[self.text]))
            if unknown:
                raise ValueError(f"unknown template ids {unknown}")
        if not any(templates_for(d, self.template_ids, self.text) for d in self.domains):
            raise ValueError("no template of the chosen domains is in template_ids")
        return self

    def selected_voices(self) -> list[Voice]:
        """Catalogue voices matching `voices` and `accents` (installed or not)."""
        names = list(CATALOGUE) if self.voices == "all" else self.voices
        accents = self.accents or ACCENTS
        chosen = [CATALOGUE[v] for v in names if CATALOGUE[v].accent in accents]
        if not chosen:
            raise ValueError(f"none of the voices {names} has an accent in {self.accents}")
        return chosen


PRESETS: dict[str, SynthSpec] = {
    "clean": SynthSpec(voices=["en-us", "kal", "slt"], domains=["general", "commands"]),
    "drift-accent-noise": SynthSpec(
        voices=["en-gb-scotland", "en-029"], rate=(185, 205), snr_db=10, noise="white",
        domains=["medical", "numbers"],
    ),
    "telephone": SynthSpec(  # the channel alone; add --snr-db/--noise babble for a call centre
        voices=["en-us", "en-gb", "slt", "rms"], telephone=True, mulaw=True,
        domains=["finance", "numbers", "commands"],
    ),
}  # fmt: skip


class Clip(BaseModel):
    """One planned clip, before any audio exists."""

    index: int
    id: str
    text: str
    voice: Voice
    rate: int
    domain: Domain
    template: str


class SynthRow(BaseModel):
    """A manifest row: `audio` and `text` for scoring, the rest as slices (strings where a
    number would have too many distinct values to slice by)."""

    audio: str
    text: str
    voice: str
    engine: str
    accent: str
    rate: int
    snr_db: str
    """"clean" or the SNR as written ("10", "7.5")."""
    snr_db_value: float | None
    noise: str
    """"none", "white" or "babble"."""
    reverb: str
    """"none" or the RT60 in seconds ("0.3")."""
    telephone: bool
    domain: str
    template: str
    duration_s: float


def speaking(spec: SynthSpec, text: TextPool, n: int, seed: int) -> SynthSpec:
    """`spec`'s acoustics (voices, rate, noise, channel) speaking `text`: a drift's
    generalisation set (unseen) or its acoustics for training (broad). Broad text is drawn from
    every domain: a drift's own few domains would repeat a few dozen sentences."""
    domains = list(DOMAINS) if text == "broad" else spec.domains
    return spec.model_copy(update={"n": n, "seed": seed, "text": text, "domains": domains})


def plan(spec: SynthSpec, voices: list[Voice] | None = None) -> list[Clip]:
    """The clips `generate` will make, without synthesising anything. Voices rotate every clip
    and domains every round of voices, so small sets still cover every voice x domain pair."""
    voices = voices or spec.selected_voices()  # generate() passes the installed ones
    domains = [d for d in spec.domains if templates_for(d, spec.template_ids, spec.text)]
    clips = []
    for i in range(spec.n):
        rng = np.random.default_rng([spec.seed, i])
        domain = domains[(i // len(voices)) % len(domains)]
        candidates = templates_for(domain, spec.template_ids, spec.text)
        if spec.text != "templates":  # fixed sentences: each once before any twice, in a seeded order
            order = np.random.default_rng([spec.seed, len(candidates)]).permutation(len(candidates))
            nth = (i // (len(voices) * len(domains))) * len(voices) + i % len(voices)  # of this domain's clips
            cycle, k = divmod(nth, len(candidates))  # a repeat moves one on: another voice says it
            template = candidates[int(order[(k + cycle) % len(candidates)])]
        else:
            template = candidates[int(rng.integers(len(candidates)))]
        clips.append(
            Clip(
                index=i,
                id=f"s{spec.seed}-{i:05d}",
                text=template.render(rng),
                voice=voices[i % len(voices)],
                rate=int(rng.integers(spec.rate[0], spec.rate[1] + 1)),
                domain=domain,
                template=template.id,
            )
        )
    return clips


def render(clip: Clip, spec: SynthSpec) -> np.ndarray:
    """Speak a clip and apply the spec's conditions: room, then noise, then the phone line."""
    rng = np.random.default_rng([spec.seed, clip.index, 1])
    x = effects.normalize_peak(synthesize(clip.voice, clip.text, clip.rate))
    if spec.reverb_rt60_s:
        x = effects.reverb(x, spec.reverb_rt60_s, rng)
    if spec.snr_db is not None:
        x = effects.add_noise(x, spec.snr_db, rng, spec.noise)
    if spec.telephone:
        x = effects.telephone(effects.normalize_peak(x), use_mulaw=spec.mulaw)
    return effects.normalize_peak(x)


def _row(clip: Clip, spec: SynthSpec, duration_s: float) -> SynthRow:
    return SynthRow(
        audio=f"audio/{clip.id}.wav",
        text=clip.text,
        voice=clip.voice.name,
        engine=clip.voice.engine,
        accent=clip.voice.accent,
        rate=clip.rate,
        snr_db="clean" if spec.snr_db is None else f"{spec.snr_db:g}",
        snr_db_value=spec.snr_db,
        noise="none" if spec.snr_db is None else spec.noise,
        reverb="none" if not spec.reverb_rt60_s else f"{spec.reverb_rt60_s:g}",
        telephone=spec.telephone,
        domain=clip.domain,
        template=clip.template,
        duration_s=round(duration_s, 3),
    )


def generate(spec: SynthSpec, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Write `out_dir/audio/<id>.wav` (16 kHz mono PCM16), `out_dir/spec.json` and
    `out_dir/manifest.jsonl` (written last, so a manifest means a complete set); returns the
    manifest's path. TTS runs in a pool of 2 threads (each waits on an engine subprocess)."""
    voices = spec.selected_voices()
    if spec.voices == "all":  # "all" means all installed; named voices must be installed
        voices = [v for v in voices if v.name in installed_voices()] or voices
    missing = [v.name for v in voices if v.name not in installed_voices()]
    if missing:
        raise RuntimeError(
            f"voices {missing} are not installed (have: {', '.join(installed_voices()) or 'none'});"
            " install espeak-ng and flite (scripts/setup.sh does)"
        )
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    manifest.unlink(missing_ok=True)  # a stale one would describe audio about to be replaced
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    clips = plan(spec, voices)

    def make(clip: Clip) -> SynthRow:
        samples = render(clip, spec)
        (out_dir / "audio" / f"{clip.id}.wav").write_bytes(audio_to_wav_bytes(samples))
        return _row(clip, spec, len(samples) / SAMPLE_RATE)

    rows: dict[int, SynthRow] = {}
    with ThreadPoolExecutor(max_workers=TTS_WORKERS) as pool:
        futures = {pool.submit(make, clip): clip.index for clip in clips}
        for done, future in enumerate(as_completed(futures), 1):
            rows[futures[future]] = future.result()
            if progress and (done % PROGRESS_EVERY == 0 or done == len(clips)):
                progress(f"  synthesised {done}/{len(clips)}")

    (out_dir / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    return write_rows(manifest, (rows[i].model_dump_json() for i in range(len(clips))))
