"""Converting the bundled GGUF into a cached safetensors model directory."""

from __future__ import annotations

import json
import shutil

import pytest

from glmkit.demo_model import GGUF_FILE, demo_model_dir, ensure_demo_model, find_gguf
from glmkit.errors import GlmkitError
from glmkit.hub import resolve_model


def test_corrupt_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / GGUF_FILE
    shutil.copyfile(find_gguf(), bad)
    with bad.open("r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 16)
    with pytest.raises(GlmkitError, match="sha256"):
        ensure_demo_model(bad)
    assert not demo_model_dir().exists()


def test_conversion_is_cached_and_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path / "cache"))
    target = resolve_model(None)
    assert target == demo_model_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in target.iterdir()
    }
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no scratch directory left behind"
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("demo") == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp, "second use must not convert again"
