"""The value of a dead-letter record, within the size the producer may send.

The record codec owns the dead-letter format; this is the one place the service asks it for a value that
fits ``max_bytes`` (the codec truncates the raw payload and flags it, keeping reason, detail and
coordinates). Where the codec cannot bound its output, the full value is returned and the committer's
``send`` refuses it, counted, if it is too large: a bad record never stops the service either way.

>>> from forecaster.errors import InvalidRecord
>>> from forecaster.service.clients import Record
>>> value = dead_letter_value(Record("in", 0, 5, 0, None, b"x"), InvalidRecord("not_json", "x"), 10_000)
>>> b'"offset": 5' in value or b'"offset":5' in value
True
"""

from __future__ import annotations

import inspect

from forecaster.errors import InvalidRecord
from forecaster.records.codec import KafkaRecord, encode_dead_letter

# Room left for the key and the record's own overhead when the codec bounds a dead letter.
KEY_ROOM_BYTES = 512

_BOUNDED = "max_bytes" in inspect.signature(encode_dead_letter).parameters


def dead_letter_value(record: KafkaRecord, error: InvalidRecord, max_bytes: int) -> bytes:
    """``encode_dead_letter`` bounded to ``max_bytes`` (less the key) where the codec supports it."""
    if _BOUNDED:
        room = max_bytes - KEY_ROOM_BYTES - (len(record.key) if record.key else 0)
        return encode_dead_letter(record, error, max_bytes=room)  # type: ignore[call-arg]
    return encode_dead_letter(record, error)
