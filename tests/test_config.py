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


def test_every_invalid_setting_is_reported_at_once_with_its_source(tmp_path: Path):
    f = tmp_path / "s.toml"
    f.write_text("[detector]\nwindow_s = 5\nwindow_seconds = 300\n[engine]\ntick_s = 0\n")
    env = {"STRESSWATCH_MQTT__KEEPALIVE_S": "1", "STRESSWATCH_MQQT__URL": "mqtt://typo:1"}
    with pytest.raises(ConfigError) as err:
        load_settings(f, env=env, overrides={"alerts.max_reminders": "-1"})
    lines = str(err.value).splitlines()
    assert len(lines) == 6, lines
    assert any(ln.startswith(f"{f}: detector.window_s:") for ln in lines)
    assert any(ln.startswith(f"{f}: detector.window_seconds:") for ln in lines)
    assert any(ln.startswith(f"{f}: engine.tick_s:") for ln in lines)
    assert any(ln.startswith("environment: mqtt.keepalive_s:") for ln in lines)
    assert any(ln.startswith("environment: STRESSWATCH_MQQT__URL: no such section") for ln in lines)
    assert any(ln.startswith("--set: alerts.max_reminders:") for ln in lines)


def test_environment_values_keep_their_type(tmp_path: Path):
    s = load_settings(
        env={
            "STRESSWATCH_MQTT__PASSWORD": "123",  # a password of digits stays a string
            "STRESSWATCH_ENGINE__KEEP_SAMPLES": "false",
            "STRESSWATCH_GROUPS__TEAM": '["sam", "kim"]',
            "stresswatch_detector__window_s": "120",
        }
    )
    assert s.mqtt.password == "123"
    assert s.engine.keep_samples is False
    assert s.groups == {"team": ["sam", "kim"]}
    assert s.detector.window_s == 120


def test_the_password_can_come_from_a_file(tmp_path: Path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret with spaces\nignored\n")
    s = load_settings(env={"STRESSWATCH_MQTT__PASSWORD_FILE": str(secret)})
    assert s.mqtt.password == "s3cret with spaces"
    explicit = load_settings(env={"STRESSWATCH_MQTT__PASSWORD_FILE": str(secret)}, overrides={"mqtt.password": "given"})
    assert explicit.mqtt.password == "given"  # an explicit password wins over the file
    with pytest.raises(ConfigError, match="environment: mqtt: cannot read the password file"):
        load_settings(env={"STRESSWATCH_MQTT__PASSWORD_FILE": str(tmp_path / "absent")})
