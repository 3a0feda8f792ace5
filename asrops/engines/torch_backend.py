"""The transformers/torch backend: CPU by default, CUDA when asked for and present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class TorchWhisperBackend:
    """Runs `WhisperForConditionalGeneration`'s encoder and decoder under our decoding loop."""

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0):
        from transformers import WhisperForConditionalGeneration

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        features = torch.from_numpy(mel).to(self.device, self.dtype)
        return self.model.model.encoder(features).last_hidden_state

    def encoder_from(self, weights: Path):
        """Another encoder of this model's shape (a slice gate's parent encoder), from a
        safetensors file of its tensors, as an encode function."""
        import copy

        from safetensors.torch import load_file

        from asrops.engines.slice_gate import ENCODER_PREFIX

        encoder = copy.deepcopy(self.model.model.encoder)
        state = {k.removeprefix(ENCODER_PREFIX): v for k, v in load_file(str(weights)).items()}
        encoder.load_state_dict(state)
        encoder.to(self.device, self.dtype).eval()

        @torch.inference_mode()
        def encode(mel: np.ndarray):
            return encoder(torch.from_numpy(mel).to(self.device, self.dtype)).last_hidden_state

        return encode

    @torch.inference_mode()
    def _decode(self, tokens: np.ndarray, encoded: torch.Tensor, past: Any, last_only: bool):
        out = self.model.model.decoder(
            input_ids=torch.from_numpy(tokens).to(self.device),
            encoder_hidden_states=encoded,
            past_key_values=past,
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        logits = self.model.proj_out(hidden).float().cpu().numpy()
        return logits, (encoded, out.past_key_values)

    def start(self, encoded: torch.Tensor, tokens: np.ndarray):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        past = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return self._decode(tokens, encoded, past, last_only=False)

    def step(self, tokens: np.ndarray, cache):
        encoded, past = cache
        logits, cache = self._decode(tokens, encoded, past, last_only=True)
        return logits[:, -1], cache

    def reorder(self, cache, index: np.ndarray):
        encoded, past = cache
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.device)
        past.reorder_cache(idx)
        return encoded.index_select(0, idx), past
