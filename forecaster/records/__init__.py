"""Wire formats: decoding and validation of input records; encoding of forecasts and dead letters."""

from forecaster.records.codec import (
    Bounds,
    DecodedBatch,
    KafkaRecord,
    RecordDecoder,
    encode_dead_letter,
    encode_forecast,
    encode_forecast_groups,
    encode_forecasts,
    encode_input,
    encode_window,
)

__all__ = [
    "DecodedBatch",
    "KafkaRecord",
    "RecordDecoder",
    "encode_dead_letter",
    "Bounds",
    "encode_forecast",
    "encode_forecast_groups",
    "encode_forecasts",
    "encode_input",
    "encode_window",
]
