"""The drift reference made from a manifest (the first-run bootstrap): an interrupted run
resumes where it stopped. Real engine, real synthetic speech, a local store."""

from __future__ import annotations

import pytest

from asrops.monitoring.reference import PARTIAL_PREFIX, from_manifest, load_reference
from asrops.registry.store import LocalStore
from asrops.synth import PRESETS, generate

pytestmark = pytest.mark.slow


class Stopped(Exception):
    pass


def test_an_interrupted_reference_resumes_where_it_stopped(engines, tmp_path):
    manifest = generate(PRESETS["clean"].model_copy(update={"n": 6, "seed": 7}), tmp_path / "clips")
    store, engine = LocalStore(tmp_path / "store"), engines["onnx-int8"]

    def stop_after_the_first_batch(line: str) -> None:
        if line.startswith("reference: 2/6"):
            raise Stopped(line)

    with pytest.raises(Stopped):
        from_manifest(store, manifest, engine, "v1", batch_size=2, progress=stop_after_the_first_batch)
    assert load_reference(store) is None and store.list_prefix(PARTIAL_PREFIX)

    lines: list[str] = []
    frame = from_manifest(store, manifest, engine, "v1", batch_size=2, progress=lines.append)
    assert lines[0].startswith("reference: resuming at 2/6")
    assert [line for line in lines if "transcribed" in line] == ["reference: 4/6 clips transcribed",
                                                                  "reference: 6/6 clips transcribed"]
    assert list(frame["request_id"]) == [f"reference-{i}" for i in range(6)]
    assert frame["text"].str.strip().astype(bool).all()
    assert not store.list_prefix(PARTIAL_PREFIX)  # finished: nothing left to resume

    # Other clips (or another version) start from the beginning.
    other = from_manifest(store, manifest, engine, "v2", batch_size=3, progress=lines.append)
    assert len(other) == 6 and not any("resuming" in line for line in lines[3:])


def test_a_bootstrap_keeps_a_reference_pinned_while_it_ran(engines, tmp_path):
    """The first-run bootstrap runs in the monitor while an operator may pin a window: it stops at
    its next batch and keeps theirs, instead of overwriting it when it ends."""
    import pandas as pd

    from asrops.monitoring.reference import save_reference

    manifest = generate(PRESETS["clean"].model_copy(update={"n": 6, "seed": 7}), tmp_path / "clips")
    store, engine = LocalStore(tmp_path / "store"), engines["onnx-int8"]
    pinned = pd.DataFrame({"request_id": ["pinned-0", "pinned-1"], "status": [200, 200],
                           "text": ["an operator's window", "of known good traffic"]})

    def pin_after_the_first_batch(line: str) -> None:
        if line.startswith("reference: 2/6"):
            save_reference(store, pinned)

    lines: list[str] = []
    frame = from_manifest(store, manifest, engine, "v1", batch_size=2, yield_to_pinned=True,
                          progress=lambda line: (lines.append(line), pin_after_the_first_batch(line)))
    assert list(frame["request_id"]) == ["pinned-0", "pinned-1"]
    assert list(load_reference(store)["request_id"]) == ["pinned-0", "pinned-1"]
    assert "keeping it" in lines[-1] and not any(line.startswith("reference: 4/6") for line in lines)
    assert not store.list_prefix(PARTIAL_PREFIX)


def test_asrops_serve_makes_the_first_reference_before_serving_and_only_once(tmp_path, monkeypatch):
    """`asrops serve` on a fresh data directory makes the reference before Ray starts (so the first
    clients never share the CPU with it); with one stored, it makes none."""
    import pandas as pd

    import asrops.models.importer as importer
    import asrops.monitoring.reference as reference
    from asrops.cli.stack import make_first_reference
    from asrops.prodlog import store_for
    from asrops.settings import Settings

    settings = Settings(data_dir=tmp_path)
    made: list[str] = []

    def synthetic(store, registry, settings, progress):
        made.append("reference")
        reference.save_reference(store, pd.DataFrame({"request_id": ["r0"], "status": [200], "text": ["clean"]}))

    monkeypatch.setattr(importer, "import_embedded_default", lambda registry, progress: made.append("import"))
    monkeypatch.setattr(reference, "synthetic_reference", synthetic)
    make_first_reference(settings, say=lambda line: None)
    assert made == ["import", "reference"]
    assert list(load_reference(store_for(settings))["request_id"]) == ["r0"]
    make_first_reference(settings, say=lambda line: None)
    assert made == ["import", "reference", "import"]  # stored already: not made again
