"""Wire formats: input records read and validated (``input``, ``strict_json``) and written (``writer``);
forecasts and dead letters (``output``)."""

from forecaster.records.input import (
    FIELDS,
    REASONS,
    SCHEMA_VERSION,
    DecodedBatch,
    KafkaRecord,
    RecordDecoder,
)
from forecaster.records.output import (
    DEAD_LETTER_MAX_BYTES,
    Bounds,
    dead_letter_max_bytes,
    encode_dead_letter,
    encode_forecast,
    encode_forecast_groups,
    encode_forecasts,
    with_intervals,
)
from forecaster.records.writer import encode_input, encode_window

__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "FIELDS",
    "REASONS",
    "SCHEMA_VERSION",
    "DecodedBatch",
    "KafkaRecord",
    "RecordDecoder",
    "dead_letter_max_bytes",
    "encode_dead_letter",
    "Bounds",
    "encode_forecast",
    "encode_forecast_groups",
    "encode_forecasts",
    "encode_input",
    "encode_window",
    "with_intervals",
]
