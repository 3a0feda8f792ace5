"""The CTranslate2 importer, checkpoint checks, and the `asrops` command end to end."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from asrops.cli.main import app
from asrops.errors import ModelImportError
from asrops.models.ct2_import import embedded_ct2_dir
from asrops.models.ct2_reader import read_ct2_model
from asrops.models.importer import check_checkpoint
from tests.ports import held_port

runner = CliRunner()


def _cli(data_dir, *args):
    result = runner.invoke(app, list(args), env={"ASROPS_DATA_DIR": str(data_dir)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_converted_weights_equal_the_ct2_originals(stable_dir):
    _, ct2 = read_ct2_model(embedded_ct2_dir() / "model.bin")
    hf = load_file(str(stable_dir / "model.safetensors"))
    q, k, v = np.split(ct2["decoder/layer_2/self_attention/linear_0/weight"].astype(np.float32), 3)
    assert np.array_equal(hf["model.decoder.layers.2.self_attn.q_proj.weight"], q)
    assert np.array_equal(hf["model.decoder.layers.2.self_attn.k_proj.weight"], k)
    assert np.array_equal(hf["model.decoder.layers.2.self_attn.v_proj.weight"], v)
    k_x, v_x = np.split(ct2["decoder/layer_1/attention/linear_1/weight"].astype(np.float32), 2)
    assert np.array_equal(hf["model.decoder.layers.1.encoder_attn.k_proj.weight"], k_x)
    assert np.array_equal(hf["model.decoder.layers.1.encoder_attn.v_proj.weight"], v_x)
    assert np.array_equal(
        hf["model.encoder.embed_positions.weight"], ct2["encoder/position_encodings/encodings"].astype(np.float32)
    )
    assert "model.decoder.layers.0.self_attn.k_proj.bias" not in hf  # Whisper's K has no bias


def test_generation_config_keeps_whispers_suppression_lists(stable_dir):
    """Without them the decoder emits quotes and other tokens Whisper never should."""
    ct2_config = json.loads((embedded_ct2_dir() / "config.json").read_text())
    gen = json.loads((stable_dir / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == ct2_config["suppress_ids"]
    assert gen["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"]
    assert gen["no_timestamps_token_id"] == 50362 and gen["decoder_start_token_id"] == 50257


def test_truncated_ct2_file_is_refused(tmp_path):
    broken = tmp_path / "model.bin"
    broken.write_bytes((embedded_ct2_dir() / "model.bin").read_bytes()[:5000])
    with pytest.raises(ModelImportError, match="truncated"):
        read_ct2_model(broken)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "bert", "vocab_size": 30522}, "not Whisper"),
        ({"model_type": "whisper", "vocab_size": 51865}, "multilingual"),
    ],
)
def test_checkpoints_we_cannot_serve_are_refused(tmp_path, config, message):
    for name in ("model.safetensors", "preprocessor_config.json", "tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match=message):
        check_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelImportError, match="missing model.safetensors"):
        check_checkpoint(tmp_path)


@pytest.mark.slow
def test_import_default_is_idempotent(data_dir):
    first = _cli(data_dir, "models", "list")
    stable_id = _cli(data_dir, "models", "import-default").strip()
    assert _cli(data_dir, "models", "list") == first
    assert re.search(rf"^{re.escape(stable_id)} .* stable$", first, re.M)
    manifest = json.loads(_cli(data_dir, "models", "show", "stable"))
    assert manifest["id"] == stable_id and manifest["family"] == "whisper-tiny.en"
    paths = {f["path"] for f in manifest["files"]}
    assert {"model.safetensors", "onnx/fp32/encoder_model.onnx", "onnx/fp32/decoder_model_merged.onnx",
            "onnx/int8/encoder_model.onnx", "onnx/int8/decoder_model_merged.onnx"} <= paths
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in manifest["files"])


@pytest.mark.slow
def test_transcribe_and_eval_commands(data_dir, speech_dir, tmp_path):
    srt = _cli(data_dir, "transcribe", str(speech_dir / "faster_whisper/jfk.flac"), "--format", "srt")
    assert re.match(r"1\n00:00:00,000 --> 00:00:\d\d,\d{3}\n", srt)
    assert "country" in srt
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"audio": str(speech_dir / "faster_whisper/jfk.flac"), "accent": "us",
         "text": "And so my fellow Americans, ask not what your country can do for you, "
                 "ask what you can do for your country."},
        {"audio": str(speech_dir / "voiceagent_minilibrispeech/dev-clean-2-0002.wav"), "accent": "uk",
         "text": "THERE WAS NOT A SINGLE NOTE OF GLOOM"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    report = json.loads(_cli(data_dir, "eval", "stable", str(manifest), "--json"))
    assert report["wer"] == 0.0 and report["cer"] == 0.0
    assert set(report["slices"]["accent"]) == {"us", "uk"}
    assert "accent" in _cli(data_dir, "eval", "stable", str(manifest))


@pytest.mark.slow
def test_import_a_local_checkpoint_as_canary(stable_dir, tmp_path):
    """Any local transformers Whisper checkpoint directory (here: the stable's own files)."""
    new_id = _cli(tmp_path, "models", "import", str(stable_dir), "--family", "whisper-tiny.en", "--alias", "canary")
    new_id = new_id.strip().splitlines()[-1]
    listing = _cli(tmp_path, "models", "list")
    assert re.search(rf"^{re.escape(new_id)} .* canary$", listing, re.M)


def _command_paths(group=None, prefix=()) -> list[list[str]]:
    """Every command and group of the CLI, walked from the app itself (a new one is covered)."""
    import typer.main

    group = group or typer.main.get_command(app)
    paths = [list(prefix)]
    for name, command in getattr(group, "commands", {}).items():
        paths += _command_paths(command, (*prefix, name)) if hasattr(command, "commands") else [[*prefix, name]]
    return paths


@pytest.mark.parametrize("command", _command_paths(), ids=lambda c: " ".join(c) or "asrops")
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_a_command_shows_our_decisions_and_hides_the_libraries_chatter():
    """Every automatic decision (a drift verdict, a retrain, a rollout step) is logged at INFO by
    the process that makes it; libraries' INFO lines (ONNX Runtime's quantiser writes them on the
    root logger by the hundred) are not shown."""
    import subprocess
    import sys

    code = ("import logging\n"
            "from asrops.cli.common import setup\n"
            "setup()\n"
            "logging.getLogger('asrops.retrain.trigger').info('retrain decided on: drifted')\n"
            "logging.info('library chatter')\n"
            "logging.getLogger('onnxruntime').info('more chatter')\n"
            "logging.getLogger('onnxruntime').warning('a library warning')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ASROPS_LOG_LEVEL": "INFO"})
    assert result.returncode == 0, result.stderr
    assert "retrain decided on: drifted" in result.stderr
    assert "a library warning" in result.stderr
    assert "chatter" not in result.stderr


def test_serve_refuses_at_once_a_port_another_program_holds(tmp_path):
    """A port `asrops serve` needs, taken by another program (here Ray's metrics port, which
    before made Ray fail minutes later with "the current node timed out during startup"): it
    stops before setting anything up, naming the port and the setting that moves it."""
    import subprocess
    import sys

    from loadtests.service_bench import free_port

    with held_port() as taken:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "ASROPS_DATA_DIR": str(tmp_path / "data"),
            "ASROPS_MONITORING__RAY_METRICS_PORT": str(taken),
            "ASROPS_MONITORING__MONITOR_PORT": str(free_port()),
            "ASROPS_PROMOTION__METRICS_PORT": str(free_port()),
            "ASROPS_MONITORING__PROMETHEUS_ENABLED": "false",
        }
        result = subprocess.run([sys.executable, "-m", "asrops.cli", "serve", "--port", str(free_port())],
                                env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(rf"\b{taken}\b.*ASROPS_MONITORING__RAY_METRICS_PORT", result.stderr), result.stderr
    assert not (tmp_path / "data").exists()  # nothing imported, no reference made, no Ray started


def test_a_free_port_and_a_taken_one_are_told_apart():
    from asrops.ports import port_in_use, ports_in_use

    with held_port() as taken:
        assert port_in_use(taken)
        assert ports_in_use({"ours": taken, "free": 0}) == {"ours": taken}
    assert not port_in_use(taken)  # closed: free again


def test_the_variable_a_message_names_is_the_one_that_sets_the_setting(monkeypatch):
    from asrops.settings import Settings, env_var

    monkeypatch.setenv(env_var("monitoring", "ray_metrics_port"), "18080")
    monkeypatch.setenv(env_var("serve", "port"), "18000")
    settings = Settings()
    assert (settings.monitoring.ray_metrics_port, settings.serve.port) == (18080, 18000)
    with pytest.raises(KeyError):
        env_var("monitoring", "metrics_port_renamed")
