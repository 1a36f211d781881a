from pathlib import Path

import pytest

from stresswatch.config import load_settings
from stresswatch.errors import ConfigError


def test_defaults_work_without_any_file():
    s = load_settings(env={})
    assert s.mqtt.prefix == "stresswatch/v1"
    assert s.detector.window_s == 300
    assert s.mqtt.url is None  # first run: commands that can, start an embedded broker


def test_layers_toml_then_environment_then_overrides(tmp_path: Path):
    f = tmp_path / "s.toml"
    f.write_text('[mqtt]\nurl = "mqtt://a:1"\nprefix = "x/v1"\n[detector]\nwindow_s = 120\n')
    s = load_settings(f, env={"STRESSWATCH_MQTT__URL": "mqtt://b:2", "UNRELATED": "1"}, overrides={"detector.window_s": "60"})
    assert s.mqtt.url == "mqtt://b:2"
    assert s.mqtt.prefix == "x/v1"
    assert s.detector.window_s == 60


def test_bad_value_names_file_and_field(tmp_path: Path):
    f = tmp_path / "s.toml"
    f.write_text("[detector]\nwindow_s = 5\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f, env={})
    assert str(f) in str(err.value) and "detector.window_s" in str(err.value)


def test_unknown_key_is_an_error_not_ignored(tmp_path: Path):
    f = tmp_path / "s.toml"
    f.write_text("[detector]\nwindow_seconds = 300\n")
    with pytest.raises(ConfigError, match="detector.window_seconds"):
        load_settings(f, env={})


def test_invalid_toml_and_missing_file(tmp_path: Path):
    f = tmp_path / "s.toml"
    f.write_text("[detector\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(f, env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml", env={})


def test_hysteresis_must_be_consistent():
    with pytest.raises(ConfigError, match="score_exit"):
        load_settings(env={}, overrides={"detector.score_exit": "3.0", "detector.score_enter": "2.0"})


def test_topic_prefix_rejects_wildcards():
    with pytest.raises(ConfigError, match="mqtt.prefix"):
        load_settings(env={"STRESSWATCH_MQTT__PREFIX": "a/#"})
