"""Settings: one ``Settings`` object, read once at the entry point and passed down.

Every value can come from the environment with the prefix ``FORECASTER_`` and ``__`` between a section
and its field, e.g. ``FORECASTER_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``FORECASTER_MODEL__HIDDEN_SIZE=128``. Tests build ``Settings(...)`` directly.

>>> s = Settings(model={"cell": "lstm"})
>>> s.model.cell
'lstm'
"""

from __future__ import annotations

import ipaddress
import json
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from forecaster.errors import ConfigError
from forecaster.model import ForecasterConfig
from forecaster.records.input import MAX_ABS_VALUE
from forecaster.timegrid import parse_period

ENV_PREFIX = "FORECASTER_"
ENV_DELIMITER = "__"
# The input consumer's (fetch_min_bytes, fetch_wait_max_ms) when not set, per Kafka client. librdkafka waits
# for 64 KB or 5 ms: under load the loop gets batches instead of a fetch per few records (docs/configuration.md: latency),
# for about 0.8 % of a core more when idle. kafka-python answers each fetch in Python: 10 ms cost it 11 % of
# a core idle (2.6 % at 100 ms), so it keeps answering at once and holding an empty fetch 100 ms.
FETCH_DEFAULTS = {"confluent": (65_536, 5), "kafka-python": (1, 100)}


class KafkaSettings(BaseModel):
    """Where the broker is, which topics to use, and how to authenticate."""

    # The client library: confluent-kafka (librdkafka, the default) or kafka-python (pure Python).
    client: Literal["confluent", "kafka-python"] = "confluent"
    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "ts.input"
    output_topic: str = "ts.forecasts"
    deadletter_topic: str = "ts.deadletter"
    changelog_topic: str = "ts.state-changelog"
    group_id: str = "forecaster"
    client_id: str = "forecaster"
    # Partitions used when the service or the topic setup creates a missing topic.
    partitions: int = Field(default=6, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=7)
    auto_create_topics: bool = True
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    # Longest wait between two reconnection attempts after the broker went away (back-off grows to it).
    reconnect_backoff_max_ms: int = Field(default=1_000, ge=10, le=60_000)

    @field_validator("bootstrap_servers")
    @classmethod
    def _hosts_have_ports(cls, value: str) -> str:
        hosts = [h.strip() for h in value.split(",") if h.strip()]
        if not hosts:
            raise ValueError("needs at least one host:port")
        for host in hosts:
            name, _, port = host.rpartition(":")
            if not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{host!r} is not host:port")
        return ",".join(hosts)

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError(f"security_protocol={self.security_protocol} needs sasl_mechanism")
            if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
                not self.sasl_username or self.sasl_password is None
            ):
                raise ValueError(
                    f"sasl_mechanism={self.sasl_mechanism} needs sasl_username and sasl_password"
                )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}={path} is not a readable file")
        return self


class ModelSettings(ForecasterConfig):
    """The model used when no checkpoint exists yet (and the shape the trainer fits), and its seed."""

    seed: int = 0
    # The net reads its baseline's last one-step error beside the value (a residual it can forecast: the
    # baseline's errors are autocorrelated on most real series, and the net cannot rebuild them from the
    # value alone, bench/residuals.py). Checkpoints without the field load without it.
    error_input: bool = True

    @property
    def config(self) -> ForecasterConfig:
        """The build arguments alone (no seed)."""
        return ForecasterConfig(**self.model_dump(exclude={"seed"}))


class ScalingSettings(BaseModel):
    """Causal per-series normalisation (see ``forecaster.scaling``)."""

    kind: Literal["ewm", "log", "none"] = (
        "ewm"  # log: positive values, seasonal swings that scale with the level
    )
    # Effective memory of the running mean and variance, in values.
    halflife: float = Field(default=256.0, gt=0.0)
    # Floor of the scale relative to |mean| (and absolute), so a flat series does not divide by zero.
    min_scale: float = Field(default=1e-3, gt=0.0)
    # A value farther than this many running scales from its series' running mean is stepped at that
    # distance (after the series' first 8 values, once it has varied; 0: off). The one-step error still
    # counts it as it came.
    clip: float = Field(default=100.0, ge=0.0)


class IntervalSettings(BaseModel):
    """Prediction intervals on every forecast, calibrated online (see ``forecaster.engine.intervals``)."""

    enabled: bool = True
    levels: list[float] = Field(default=[80.0, 95.0], min_length=1, max_length=8)  # nominal coverage, %
    # Step of the online quantile tracker per value scored (in multiples of the mean error).
    learning_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    # Memory of each series' mean absolute k-step error, in values scored.
    halflife: float = Field(default=16.0, gt=0.0)

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < level < 100.0 for level in value) or len(set(value)) != len(value):
            raise ValueError("levels must be distinct percentages strictly between 0 and 100")
        return sorted(value)


class ChoiceSettings(BaseModel):
    """Per-series choice between the model's forecast and the naive ones (``forecaster.engine.choice``)."""

    enabled: bool = True
    halflife: float = Field(default=64.0, gt=0.0)  # memory of each candidate's mean k-step error, in errors
    # A naive forecast must beat the model's mean error by this share of its own and by z standard errors.
    margin: float = Field(default=0.05, ge=0.0, le=10.0)
    z: float = Field(default=2.0, ge=0.0, le=10.0)
    min_errors: int = Field(default=16, ge=1)  # k-step errors a series needs before it may switch


class StateSettings(BaseModel):
    """The per-series state table."""

    device: str = "auto"  # "auto": cuda when available, else cpu
    window: int = Field(default=256, ge=1, le=1_000_000)  # retained values per series (re-warm on swap)
    initial_capacity: int = Field(default=1024, ge=1)
    max_series: int = Field(default=1_000_000, ge=1)  # LRU eviction above this
    ttl_seconds: float = Field(default=7 * 24 * 3600.0, gt=0.0)  # idle series are evicted after this
    # Exactly once: evicted series' snapshots kept in memory up to this many bytes (the most recently
    # evicted), the rest in one SQLite file per instance under spill_dir (recreated at every start).
    evicted_memory_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    spill_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "forecaster-state")
    # A step is a period: "auto" takes the serving model's (the spacing it was trained on) and lets each
    # series without one learn its own from its first spacings; "none" steps every value as it comes; a
    # duration ("1h", "30min", "15m", "1d" or milliseconds) puts every series on that grid.
    period: str = "auto"
    # A gap of more missing periods than this is stepped through only to its season's phase (a restart):
    # the cost of one late value stays bounded.
    max_gap_periods: int = Field(default=256, ge=0, le=100_000)

    @field_validator("period")
    @classmethod
    def _known_period(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "none"):
            parse_period(value)  # raises ValueError with the accepted forms
        return value

    @field_validator("spill_dir")
    @classmethod
    def _spill_dir_is_a_folder(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a folder")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto" and not (value == "cpu" or value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value


class ServiceSettings(BaseModel):
    """The streaming loop."""

    # exactly_once: forecasts, state changelog and input offsets commit as one Kafka transaction.
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    max_poll_records: int = Field(default=2000, ge=1, le=1_000_000)
    # A batch stops growing after this long in the loop (what a poll returns is bounded by max_poll_records;
    # this bounds a batch of large windowed records), so the loop stays responsive.
    max_batch_ms: int = Field(default=1_000, ge=10, le=600_000)
    poll_timeout_ms: int = Field(default=100, ge=0, le=60_000)
    # Low latency at light traffic, few requests at heavy: the broker answers a fetch once fetch_min_bytes
    # of records are there or after fetch_wait_max_ms (so a record waits at most that long, and a loaded
    # loop gets batches rather than a fetch per few records); forecasts wait at most linger_ms to be
    # batched; commits (exactly once: when forecasts become readable) every commit_interval_ms.
    # None: the Kafka client's default (FETCH_DEFAULTS), filled in when the settings are read.
    fetch_min_bytes: int | None = Field(default=None, ge=1, le=100 << 20)
    fetch_wait_max_ms: int | None = Field(default=None, ge=0, le=10_000)
    commit_interval_ms: int = Field(default=100, ge=0)
    commit_records: int = Field(default=20_000, ge=1)
    max_window_values: int = Field(default=10_000, ge=1)  # values in one windowed input record
    max_series_length: int = Field(default=256, ge=1, le=4096)  # characters in a series id
    max_future_ms: int = Field(default=366 * 24 * 3600 * 1000, ge=0)  # ts further ahead is absurd
    # A value further from 0 is dead-lettered (out_of_range); see MAX_ABS_VALUE.
    max_abs_value: float = Field(default=MAX_ABS_VALUE, gt=0.0, le=MAX_ABS_VALUE)
    transactional_id: str | None = None  # default: "<group_id>-<instance_id>"
    # Stable per instance across restarts (a restart fences its own zombie); default: the host name, so
    # replicas (`docker compose --scale`) differ while a restarted container keeps its own.
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    checkpoint_poll_seconds: float = Field(default=5.0, gt=0.0)
    # A swap re-warms at the batch boundary up to this many retained values (series x window), above it on
    # a copy in the background, catching up the values stepped meanwhile (forecaster.engine.rewarm).
    background_rewarm_values: int = Field(default=1 << 20, ge=0)
    linger_ms: int = Field(default=5, ge=0, le=10_000)  # producer batching delay for forecasts
    # Exactly once: a transaction open longer than this is aborted by the broker (at most the broker's
    # transaction.max.timeout.ms, 15 minutes by default); it also bounds the wait on a commit and how long a
    # restore waits for a previous owner's open transaction to settle.
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000, le=900_000)
    close_timeout_seconds: float = Field(default=30.0, gt=0.0)  # flush on stop at most this long
    # A member silent this long leaves the group (heartbeats run on the clients' own threads). 6 s, the
    # broker's minimum: after a broker outage a member whose session ran out rejoins only once its old
    # membership has timed out on the restarted coordinator, so this bounds that wait.
    session_timeout_ms: int = Field(default=6_000, ge=1_000)
    # A member that has lag but consumes nothing, has lost its group membership, or whose loop has not
    # turned, for this long, is stalled: logged once, counted, /healthz fails, and it rejoins the group.
    stall_seconds: float = Field(default=60.0, gt=0.0)
    torch_threads: int = Field(
        default=1, ge=0, le=1024
    )  # intra-op threads; one process per core. 0: torch's default
    # "value": one forecast record per stepped value; "window": one per input record, its values' forecasts
    # in lists (amortises the per-record cost of windowed input; see docs/wire-formats.md).
    forecast_records: Literal["value", "window"] = "value"
    # The largest record the service produces (Kafka's default max.request.size); a dead letter of a record
    # near the input's limit is cut to fit under it, so no input record can stop the service.
    max_message_bytes: int = 1_048_576

    @field_validator("max_message_bytes")
    @classmethod
    def _room_for_a_dead_letter(cls, value: int) -> int:
        if not 4096 <= value <= 1_000_000_000:
            raise ValueError(
                "must be 4096 (room for a cut dead letter and its record headers) to 1000000000 bytes"
            )
        return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsSettings(BaseModel):
    """The Prometheus endpoint (``/metrics``), the health answers (``/healthz``, ``/readyz``) and the series
    view (``/series/<id>``)."""

    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)  # 0: do not serve
    refresh_seconds: float = Field(default=1.0, gt=0.0)  # state figures and online error copied this often
    # Consumer lag asked of the broker this often; also how soon /readyz notices the broker gone or back.
    lag_interval_seconds: float = Field(default=2.0, gt=0.0)
    # /series/<id> and /series/<id>/view (a series' recent values and forecast): None = on when `host` is a
    # loopback address only, since the page shows data to whoever reaches the port.
    series_view: bool | None = None

    @property
    def series_view_on(self) -> bool:
        """Whether the series routes answer: ``series_view``, or by default only on a loopback bind."""
        if self.series_view is not None:
            return self.series_view
        return self.host == "localhost" or _is_loopback(self.host)


class CheckpointSettings(BaseModel):
    """Where versioned checkpoints live, and how a new one comes to serve."""

    dir: Path = Path("checkpoints")
    # immediate: a better checkpoint is published (LATEST) and swapped in at once. shadow: it is proposed
    # (CANDIDATE), stepped beside the champion on live values and promoted only when it wins there.
    promotion: Literal["immediate", "shadow"] = "immediate"
    shadow_min_values: int = Field(default=1000, ge=10)  # values scored at each step before a promotion
    shadow_max_values: int = Field(default=50_000, ge=10)  # no win after this many: rejected
    # The win: the mean paired difference of absolute errors (champion minus challenger) above this many
    # standard errors, at step 1 and at the last step.
    shadow_z: float = Field(default=3.0, gt=0.0)
    # Also compare interval coverage: the challenger computes bounds too (about 1.3x its step cost).
    shadow_coverage: bool = False

    @model_validator(mode="after")
    def _shadow_bounds(self) -> CheckpointSettings:
        if self.shadow_max_values < self.shadow_min_values:
            raise ValueError(
                f"shadow_max_values ({self.shadow_max_values}) is below shadow_min_values"
                f" ({self.shadow_min_values})"
            )
        return self


class TrainSettings(BaseModel):
    """The offline trainer."""

    epochs: int = Field(default=20, ge=1)
    chunk_length: int = Field(default=64, ge=2)  # truncated BPTT chunk
    batch_series: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    validation_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    patience: int = Field(default=3, ge=1)
    # What an error costs in training: "mae" (absolute: the median, what MAE and MASE score) or "mse"
    # (squared: the mean). Early stopping watches the same loss on the validation part.
    loss: Literal["mae", "mse"] = "mae"
    # The fitted net replaces its untrained baseline only when its validation MAE is lower by more than
    # this many standard errors of the difference (0: any lower MAE); on a few short series the two are
    # often within noise, and then the baseline is kept.
    trust_z: float = Field(default=1.0, ge=0.0)
    season: int | None = Field(default=None, ge=1)
    # Longer seasons the baseline may also use (e.g. a week of hourly values, 168, beside a day, 24); each
    # needs state.window to hold it (two of them to average two).
    seasons: list[Annotated[int, Field(ge=2)]] = Field(default_factory=list)
    publish_only_if_better: bool = True
    metrics_port: int = Field(default=9109, ge=0, le=65535)
    max_values: int = Field(default=5_000_000, ge=1)
    # Forecasts made before a series has this many values are not scored in training (scale unsettled).
    warmup: int = Field(default=8, ge=0)
    # Publish only if the validation MAE is at least this fraction below the published model's.
    min_improvement: float = Field(default=0.0, ge=0.0, lt=1.0)
    # `forecaster train` lowers its own CPU priority by this much (nice(2)): on cores it shares with
    # `forecaster serve`, a training run then takes what serving leaves instead of delaying forecasts.
    niceness: int = Field(default=10, ge=0, le=19)


class Settings(BaseSettings):
    """All settings of forecaster, one section per part."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        env_file=None,
        extra="ignore",
        protected_namespaces=(),
    )

    kafka: KafkaSettings = KafkaSettings()
    model: ModelSettings = ModelSettings()
    scaling: ScalingSettings = ScalingSettings()
    state: StateSettings = StateSettings()
    intervals: IntervalSettings = IntervalSettings()
    choice: ChoiceSettings = ChoiceSettings()
    service: ServiceSettings = ServiceSettings()
    metrics: MetricsSettings = MetricsSettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    train: TrainSettings = TrainSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _fetch_defaults(self) -> Settings:
        """The fetch settings left unset take the chosen Kafka client's defaults."""
        defaults = zip(
            ("fetch_min_bytes", "fetch_wait_max_ms"), FETCH_DEFAULTS[self.kafka.client], strict=True
        )
        unset = {name: value for name, value in defaults if getattr(self.service, name) is None}
        if unset:
            self.service = self.service.model_copy(update=unset)
        return self

    def masked_json(self) -> str:
        """The effective settings as JSON, secrets masked."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, turning a bad value into a one-line ``ConfigError``."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad value, naming the environment variable that sets it."""
    lines = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"] if not str(part).isdigit()]
        variable = ENV_PREFIX + ENV_DELIMITER.join(part.upper() for part in location)
        given = error.get("input")
        shown = "" if isinstance(given, dict) or "password" in variable.lower() else f" (got {given!r})"
        lines.append(f"{variable}: {error['msg']}{shown}")
    return "invalid settings: " + "; ".join(lines)
