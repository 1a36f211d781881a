"""docs/CONFIG.md stays true: its example is valid configuration and names every setting."""

import re
import tomllib
from pathlib import Path

from stresswatch.config import Settings, load_settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def example() -> str:
    return re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_the_documented_example_loads(tmp_path):
    f = tmp_path / "example.toml"
    f.write_text(example())
    s = load_settings(f, env={})
    assert s.groups == {"team-north": ["sam", "kim"]}
    assert s.mqtt.url == "mqtt://127.0.0.1:1883"


def test_every_setting_is_documented():
    documented = tomllib.loads(example())
    for section, model in Settings.model_fields.items():
        if section == "groups":
            continue
        fields = set(model.annotation.model_fields)  # type: ignore[union-attr]
        missing = fields - set(documented.get(section, {}))
        assert not missing, f"docs/CONFIG.md [{section}] lacks {sorted(missing)}"
