"""Settings come from ZUTIS_* once, in the factory; a missing checkpoint is a clear error naming the file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings


def test_settings_read_the_zutis_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ZUTIS_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("ZUTIS_API_KEY", "k")
    monkeypatch.setenv("ZUTIS_CHECKPOINT", str(tmp_path / "x.safetensors"))
    settings = Settings()
    assert settings.max_batch_size == 3
    assert settings.api_key.get_secret_value() == "k"
    assert settings.checkpoint == tmp_path / "x.safetensors"
    assert Settings(max_batch_size=5).max_batch_size == 5  # explicit arguments win
    assert str(Settings().api_key) != "k"  # never printed
    monkeypatch.setenv("ZUTIS_MAX_BATCH_SIZE", "")  # compose passes unset variables through as empty
    assert Settings().max_batch_size == 8


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("ZUTIS_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings()
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="int8")
    with pytest.raises(ValidationError):
        Settings(max_batch_sise=4)  # a typo is an error, not ignored


def test_defaults():
    settings = Settings()
    assert settings.checkpoint.as_posix() == "weights/zutis-shapes.safetensors"
    assert (settings.max_batch_size, settings.max_batch_delay_ms, settings.device, settings.dtype) == (8, 5.0,
                                                                                                        "auto", "auto")
    assert settings.api_key is None


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "zutis-shapes.safetensors"
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*zutis-shapes.safetensors"):
        create_app(Settings(checkpoint=missing))
    not_ours = tmp_path / "other.safetensors"
    not_ours.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="other.safetensors"):
        create_app(Settings(checkpoint=not_ours))
