"""One exception family: everything forecaster raises on purpose is a ``ForecasterError``."""


class ForecasterError(Exception):
    """Base of every error forecaster raises on purpose."""


class ConfigError(ForecasterError):
    """A setting has a bad value; the message names the environment variable."""


class InvalidRecord(ForecasterError):
    """An input record failed validation; ``reason`` is a short stable code used as a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CheckpointError(ForecasterError):
    """A checkpoint is missing, incomplete, tampered with or does not match its manifest."""


class StateError(ForecasterError):
    """A state snapshot cannot be restored (corrupt bytes, unknown format, wrong shape)."""


class ChangelogRecordError(StateError):
    """A changelog record that cannot be restored; ``reason`` is one of the changelog's ``REFUSALS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class KafkaSetupError(ForecasterError):
    """The broker or a topic is not as the service needs it (unreachable, wrong partition count)."""


class DataError(ForecasterError):
    """A data file cannot be read as a time series (missing columns, empty, unknown format)."""


class NotEnoughHistory(DataError):
    """There is no history yet, or too little to train on: a periodic trainer waits for more, it has not failed."""


class DeliveryError(ForecasterError):
    """The broker did not acknowledge some forecasts or dead letters: offsets stay uncommitted."""


class KafkaClientError(ForecasterError):
    """A Kafka client call failed; ``reason`` (one of ``KAFKA_REASONS``) says what kind of failure, so that
    callers sort errors without reading messages or knowing which client library is underneath."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Kinds of ``KafkaClientError``: another producer took the transactional id over; the group does not know
# this member's generation (offsets refused); no answer in time; a record over the size limit; the open
# transaction must be aborted; the client cannot go on (a new one is needed); the broker is not reachable;
# authentication or authorisation refused; anything else.
KAFKA_REASONS = (
    "fenced",
    "group",
    "timeout",
    "too_large",
    "abortable",
    "fatal",
    "unavailable",
    "auth",
    "other",
)


class ProducerFenced(KafkaClientError):
    """Another instance runs with this transactional id: this one is a zombie and must stop."""

    def __init__(self, detail: str) -> None:
        super().__init__("fenced", detail)


class ReportError(ForecasterError):
    """The report cannot be drawn (matplotlib missing) or written."""
