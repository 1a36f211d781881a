"""Settings: defaults < one TOML file < environment < command-line ``--set``.

Environment variables are ``STRESSWATCH_<SECTION>__<KEY>`` (for example
``STRESSWATCH_MQTT__URL=mqtt://broker:1883``). Every default suits a first run on one
machine; see ``docs/CONFIG.md`` for the reasoning behind the detector's thresholds.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .clock import is_zone
from .errors import ConfigError
from .wire.limits import TimeWindow

ENV_PREFIX = "STRESSWATCH_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSettings(_Section):
    url: str | None = Field(
        default=None,
        description="mqtt://host:port or mqtts://host:port; unset means an embedded broker where a command offers one",
    )
    ingest_url: str | None = Field(
        default=None,
        description="the ingest broker (stresswatch broker config writes it: mosquitto-ingest.conf): where companions "
        "publish samples and the engine receives them; unset means mqtt.url carries ingest too",
    )
    ingest_reader: Literal["bulk", "paho"] = Field(
        default="bulk",
        description="the engine's ingest client: bulk (many MQTT packets per socket read; measured 2-3x less CPU per "
        "message than paho, docs/INGEST.md) or paho",
    )
    prefix: str = "stresswatch/v1"
    username: str | None = None
    password: str | None = None
    password_file: Path | None = Field(
        default=None, description="read the password from this file's first line (when no password is given)"
    )
    protocol: Literal["auto", "5", "3.1.1"] = "auto"  # auto: MQTT 5, falling back to 3.1.1 (amqtt)
    client_id: str = "stresswatch-engine"
    keepalive_s: int = Field(default=30, ge=5)
    alert_expiry_s: int = Field(default=24 * 3600, ge=60)  # MQTT 5 message expiry on alerts

    @field_validator("prefix")
    @classmethod
    def _prefix_has_no_wildcards(cls, v: str) -> str:
        if not v or any(c in v for c in "+#") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a topic prefix without wildcards or leading/trailing '/'")
        return v


    @model_validator(mode="before")
    @classmethod
    def _password_from_file(cls, data: Any) -> Any:
        # Read once, at start-up: a missing file is a configuration error now, not at the
        # first reconnect; every client built from these settings then has the password.
        if isinstance(data, dict) and data.get("password") is None and data.get("password_file"):
            data = {**data, "password": read_password_file(Path(data["password_file"]))}
        return data


def ingest_url_of(mqtt: MqttSettings, url: str | None = None) -> str | None:
    """Where ingest goes: ``mqtt.ingest_url``, else ``url`` (a command's ``--broker``), else ``mqtt.url``."""
    return mqtt.ingest_url or url or mqtt.url


def read_password_file(path: Path) -> str:
    """The first line of ``path``, without its line end: a password kept out of the
    command line, the environment and the TOML file (a secret mounted as a file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the password file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ValueError(f"the password file {path} is empty")
    return password


def _check_zone(tz: str, who: str = "") -> str:
    if not is_zone(tz):
        raise ValueError(f"{who}unknown time zone {tz!r} (expected an IANA name such as Europe/Berlin)")
    return tz


class DetectorSettings(_Section):
    """Defaults follow short-term HRV practice (Task Force 1996; Shaffer & Ginsberg 2017)."""

    window_s: int = Field(
        default=300, ge=60, multiple_of=60, description="5-min windows: the standard short-term HRV length (whole minutes)"
    )
    rr_min_ms: float = Field(default=300.0, gt=0, description="below: not a physiological beat (200 bpm)")
    rr_max_ms: float = Field(default=2000.0, gt=0, description="above: a missed beat (30 bpm)")
    rr_max_change: float = Field(
        default=0.2, gt=0, lt=1, description="successive-difference rule: drop a beat differing >20 % from the last kept one"
    )
    min_coverage: float = Field(default=0.5, ge=0, le=1, description="share of the window covered by clean beats")
    min_hr_samples: int = Field(
        default=3, ge=1, description="HR-only windows need at least this many readings (exports give one a minute)"
    )
    baseline_slots: int = Field(
        default=4, ge=1, le=24, description="time-of-day baselines per user: 4 = 6-hour slots (UTC), 1 = one all-day baseline"
    )
    baseline_windows: int = Field(
        default=216, ge=10, description="trailing clean windows kept per user and slot (216 = 3 days of a 6-h slot)"
    )
    baseline_min_windows: int = Field(
        default=36, ge=5, description="a slot is calibrating until it has this many clean windows (3 h)"
    )
    baseline_refresh_s: int = Field(
        default=3600, ge=1, description="median/MAD of a slot recomputed once per this period (staggered per user)"
    )
    neighbour_hr_gap_bpm: float = Field(
        default=4.0, ge=0, description="a neighbouring slot whose HR baseline differs this much may excuse a window (sleep/wake)"
    )
    hr_scale_floor_bpm: float = Field(default=2.0, gt=0, description="least HR scale: 1 bpm must not be a large z")
    ln_rmssd_scale_floor: float = Field(default=0.08, gt=0, description="least ln RMSSD scale (~8 % RMSSD)")
    score_enter: float = Field(default=2.5, description="a window scoring this high is not learned into the baseline")
    score_exit: float = Field(default=1.0, description="episode ends below this score (hysteresis)")
    stress_hr_rise: float = Field(
        default=0.10, ge=0, description="expected HR rise of an acute stress response (share of baseline; Castaldo et al. 2015)"
    )
    stress_rmssd_drop: float = Field(
        default=0.30, ge=0, lt=1, description="expected RMSSD drop of an acute stress response (share of baseline)"
    )
    cusum_k: float = Field(default=1.0, ge=0, description="CUSUM allowance: each window's log-likelihood ratio minus this is evidence")
    cusum_h: float = Field(default=16.0, gt=0, description="CUSUM decision: an episode starts when the evidence (log-likelihood ratio) reaches this")
    sustain_windows: int = Field(default=1, ge=1, description="consecutive minutes with evidence >= cusum_h before an alert")
    exit_windows: int = Field(default=2, ge=1, description="consecutive calm windows (their minutes) that end an episode")
    cooldown_s: int = Field(default=3600, ge=0, description="no new alert for a user this long after one")
    motion_steps_per_min: float = Field(default=60.0, ge=0, description="walking cadence: window suppressed")
    motion_min: float = Field(
        default=1.0, ge=0, description="mean `motion` sample (dynamic acceleration, m/s^2) at or above which a window is movement"
    )
    exercise_hr_ratio: float = Field(
        default=1.4, gt=1, description="without motion data: HR this far above baseline is treated as exercise"
    )
    activity_hr_ratio_without_motion: float = Field(
        default=1.2, gt=1, description="no steps or motion from this person yet: a minute's HR this far above baseline is activity"
    )
    activity_hr_span_without_motion: float = Field(
        default=1.0,
        gt=0,
        description="no steps or motion from this person yet: minutes' HR spanning this share of baseline within one window is the steep onset or end of activity (1.0: off; 0.15 hides ordinary minutes of a real healthy hour)",
    )
    activity_recovery_s: int = Field(
        default=300, ge=0, description="windows starting this soon after a walk, stairs or other non-exercise movement are suppressed"
    )
    exercise_hr_bpm: float = Field(
        default=120.0, gt=0, description="while a slot has no baseline yet: HR at or above this is treated as exercise"
    )
    motion_recovery_s: int = Field(
        default=1800, ge=0, description="windows starting this soon after exercise (HR >= exercise_hr_ratio x baseline) are suppressed"
    )
    reason_z: float = Field(default=1.0, ge=0, description="a feature is named as a reason at this robust z or beyond")
    high_score: float = Field(default=4.0, description="alert level 'high' at or above this episode peak score")
    timezone: str = Field(
        default="UTC", description="IANA zone of the time-of-day baselines of people whose consent names none (e.g. Europe/Berlin)"
    )
    user_timezones: dict[str, str] = Field(
        default_factory=dict, description="per person: IANA zone when their consent names none (a consent's zone comes first)"
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return _check_zone(v)

    @field_validator("user_timezones")
    @classmethod
    def _zones(cls, v: dict[str, str]) -> dict[str, str]:
        for user, tz in v.items():
            _check_zone(tz, f"{user}: ")
        return v

    @model_validator(mode="after")
    def _hysteresis(self) -> DetectorSettings:
        if self.score_exit > self.score_enter:
            raise ValueError("score_exit must not exceed score_enter")
        if self.rr_min_ms >= self.rr_max_ms:
            raise ValueError("rr_min_ms must be below rr_max_ms")
        if self.baseline_min_windows > self.baseline_windows:
            raise ValueError("baseline_min_windows must not exceed baseline_windows")
        if 86400 % (self.baseline_slots * self.window_s):
            raise ValueError("a day must split into whole windows per baseline slot (baseline_slots * window_s divides 86400)")
        if self.baseline_refresh_s % self.window_s or self.baseline_refresh_s > self.baseline_windows * self.window_s:
            raise ValueError("baseline_refresh_s must be a multiple of window_s and at most baseline_windows windows")
        return self


class StoreSettings(_Section):
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "stresswatch",
        description="consent ledger, alert outbox and baselines (SQLite)",
    )

    @property
    def db_path(self) -> Path:
        return self.state_dir / "stresswatch.sqlite"


class AlertSettings(_Section):
    """Alert lifecycle (docs/ALERTS.md): escalation within the user's chosen recipients."""

    escalate_after_s: int = Field(default=900, ge=1, description="not acknowledged this long: notify the next recipient")
    renotify_after_s: int = Field(default=900, ge=1, description="after the last recipient: remind, this often")
    max_reminders: int = Field(default=2, ge=0)
    cooldown_s: int = Field(default=1800, ge=0, description="wall-clock gap between two alerts sent about one user")
    checkin_cooldown_s: int = Field(default=300, ge=0, description="the same between two check-ins of one person (its own cooldown)")
    resend_after_s: float = Field(default=10.0, gt=0, description="no PUBACK this long: publish again (same alert_id)")


class EngineSettings(_Section):
    tick_s: float = Field(default=5.0, gt=0, description="detector advance() and scheduler cadence")
    grace_s: int = Field(default=60, ge=0, description="a window closes this long after its end without new data")
    persist_s: float = Field(default=60.0, gt=0, description="save detector state and buffered samples this often")
    state_chunk_users: int = Field(default=4096, ge=1, le=1_000_000, description="users per detector snapshot chunk (a save copies only chunks that changed; fixed by a state folder's first save)")
    keep_samples: bool = Field(default=True, description="store consenting users' samples (export, research)")
    ingest_max_age_days: float = Field(default=400.0, gt=0, le=73_000, description="refuse ingest samples older than this (docs/INGEST.md)")
    ingest_max_future_s: float = Field(default=600.0, ge=0, le=86_400, description="refuse ingest samples further ahead of the engine's clock")

    def time_window(self) -> TimeWindow:
        """The wire boundary's window around now (:class:`stresswatch.wire.limits.TimeWindow`)."""
        return TimeWindow(max_age_s=self.ingest_max_age_days * 86_400, max_future_s=self.ingest_max_future_s)


class MetricsSettings(_Section):
    """The engine's operator endpoint: ``/metrics`` (Prometheus text format) and ``/healthz``."""

    enabled: bool = Field(default=True, description="serve /metrics and /healthz while the engine runs")
    host: str = Field(default="127.0.0.1", min_length=1, description="address to bind: loopback unless a scraper elsewhere needs it (no authentication)")
    port: int = Field(default=9779, ge=0, le=65535, description="TCP port; 0 picks a free one (logged)")
    stall_s: float = Field(default=30.0, gt=0, description="/healthz fails when the engine thread has not turned for this long")


class ClusterSettings(_Section):
    """Cluster mode: users partitioned over engine processes on NATS JetStream (docs/CLUSTER.md).
    Every engine of one cluster must use the same ``partitions``."""

    name: str = Field(default="sw", pattern=r"^[a-z][a-z0-9]{0,15}$", description="the cluster's namespace: stream, subject and bucket names")
    partitions: int = Field(default=16, ge=1, le=1024, description="users are spread over this many partitions (fixed for the cluster's life)")
    replicas: int = Field(default=3, ge=1, le=5, description="JetStream replicas of the ingest stream, buckets and snapshots")
    lease_ttl_s: float = Field(default=10.0, ge=1, description="a partition whose owner has not renewed its lease this long is taken over")
    snapshot_s: float = Field(default=60.0, gt=0, description="save each owned partition's state (detector, outbox, sequence) this often")
    fetch_batch: int = Field(default=1000, ge=1, le=100_000, description="ingest messages pulled per call per partition")
    retention_days: float = Field(default=7.0, gt=0, description="ingest kept at most this long (also trimmed behind each snapshot)")
    companions: Literal["bridge", "nats-mqtt"] = Field(
        default="bridge",
        description="how companions' batches enter the stream: `stresswatch cluster bridge` from Mosquitto (MQTT 5), or NATS's own MQTT listener "
        "(MQTT 3.1.1; `stresswatch cluster nats-conf`); docs/CLUSTER.md",
    )


def _check_groups(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    for name, members in groups.items():
        if not members:
            raise ValueError(f"group {name!r} has no members")
    return groups


class Settings(BaseSettings):
    """All settings. Construct with :func:`load_settings` for the layers; ``Settings()`` is the
    defaults only (it reads no environment: every layer is explicit in :func:`load_settings`)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    mqtt: MqttSettings = MqttSettings()
    detector: DetectorSettings = DetectorSettings()
    store: StoreSettings = Field(default_factory=StoreSettings)
    alerts: AlertSettings = AlertSettings()
    engine: EngineSettings = EngineSettings()
    metrics: MetricsSettings = MetricsSettings()
    cluster: ClusterSettings = ClusterSettings()
    # Named groups of workers a user may choose as recipients, e.g. team-north = ["sam", "kim"].
    groups: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("groups")
    @classmethod
    def _groups_not_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _check_groups(v)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _deep_set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError("is not a section", source="--set", field=p)
        tree = node
    tree[leaf] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _parse_scalar(text: str) -> Any:
    """``--set`` values are TOML scalars when they parse as one, else strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``os.environ`` by default),
    so a caller (and a test) decides which environment a load sees."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}  # names are case-insensitive


def _has(tree: Mapping[str, Any], loc: tuple[str | int, ...]) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from the layers (defaults < TOML file < environment < ``overrides``).

    Every problem is reported at once: :class:`ConfigError` has one line per invalid or
    unknown setting, each naming the field and the layer it came from.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError("no such file", source=path)
        try:
            layers.append((str(path), dict(TomlConfigSettingsSource(Settings, toml_file=Path(path))())))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=path) from None
    problems: list[tuple[str, str, str]] = []  # (source, field, message)
    for key in env:
        section = key[len(ENV_PREFIX) :].split("__", 1)[0].lower() if key.upper().startswith(ENV_PREFIX) and "__" in key else None
        if section is not None and section not in Settings.model_fields:
            problems.append(("environment", key, "no such section"))
    layers.append(("environment", _Environment(env)()))
    tree_set: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        _deep_set(tree_set, dotted, _parse_scalar(value) if isinstance(value, str) else value)
    layers.append(("--set", tree_set))
    tree: dict[str, Any] = {}
    for _, layer in layers:
        tree = _deep_merge(tree, layer)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            source = next((name for name, layer in reversed(layers) if _has(layer, loc)), None)
            source = source or next((name for name, layer in reversed(layers) if loc and _has(layer, loc[:1])), "defaults")
            problems.append((source, ".".join(str(p) for p in loc), err["msg"].removeprefix("Value error, ")))
    if len(problems) == 1:
        source, field, message = problems[0]
        raise ConfigError(message, source=source, field=field or None)
    if problems:
        raise ConfigError("\n".join(f"{source}: {field}: {message}" for source, field, message in problems))
    return settings
