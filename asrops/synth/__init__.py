"""Synthetic labelled speech (espeak-ng and flite voices, noise, reverb, telephone channel) for
load tests, drift scenarios and retraining tests. Entry point: `generate(spec, out_dir)`."""

from asrops.synth.generate import PRESETS, SynthRow, SynthSpec, generate, plan, speaking
from asrops.synth.text import DOMAINS, TEMPLATES, shared_templates, split_templates
from asrops.synth.voices import CATALOGUE, installed_voices

__all__ = [
    "CATALOGUE",
    "DOMAINS",
    "PRESETS",
    "TEMPLATES",
    "SynthRow",
    "SynthSpec",
    "generate",
    "installed_voices",
    "plan",
    "shared_templates",
    "speaking",
    "split_templates",
]
