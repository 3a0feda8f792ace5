"""Whisper's English text normaliser, so WER compares words rather than spelling, case,
punctuation or number formatting.

transformers ships the normaliser but not its British->American spelling map; we ship
openai/whisper's `english.json` (MIT, licence beside it) as `asrops/data/english_spelling.json`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path
from types import ModuleType

_MODULE = "transformers.models.whisper.english_normalizer"


def load_spelling_mapping() -> dict[str, str]:
    """British -> American spellings ("colour" -> "color"), from the packaged data file."""
    text = files("asrops").joinpath("data/english_spelling.json").read_text(encoding="utf-8")
    return json.loads(text)


def _normalizer_module() -> ModuleType:
    """transformers' english_normalizer.py needs only `regex`, but importing it the usual way
    imports transformers and torch (~10 s); load the file alone unless that already happened."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    package = importlib.util.find_spec("transformers")  # finds, does not import
    if package is None or package.origin is None:
        return importlib.import_module(_MODULE)  # raises a clear ImportError
    path = Path(package.origin).parent / "models" / "whisper" / "english_normalizer.py"
    spec = importlib.util.spec_from_file_location("asrops._whisper_english_normalizer", path)
    if spec is None or spec.loader is None or not path.exists():
        return importlib.import_module(_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _normalizer():
    return _normalizer_module().EnglishTextNormalizer(load_spelling_mapping())


def normalize_english(text: str) -> str:
    """Normalise as Whisper's evaluation does: lower case, no punctuation or fillers,
    numbers as digits, American spelling ("The colour is Grey" -> "the color is gray")."""
    return _normalizer()(text)
