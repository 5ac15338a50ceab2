"""The batch format between agent and collector: :mod:`.format` defines it (and
its compatibility rule), :mod:`.encode` makes every byte of it, :mod:`.decode`
reads and validates it."""

from __future__ import annotations

from agent.shared.wire.decode import decode_batch, decode_rows, rows_of, unpack
from agent.shared.wire.encode import (
    EventPacker,
    encode_batch,
    encode_event,
    encode_times,
    event_map,
    facts_map,
)
from agent.shared.wire.format import (
    ACTIONS,
    MAX_BIN,
    MAX_BODY,
    MAX_CMD,
    MAX_ID,
    MAX_RECORDS,
    MAX_STR,
    MAX_TS,
    SUPPORTED_VERSIONS,
    VERSION,
    Batch,
    CountRecord,
    EventRecord,
    GapRecord,
    RowBatch,
    pair_key,
    valid_agent_id,
)

__all__ = [
    "VERSION",
    "SUPPORTED_VERSIONS",
    "MAX_BODY",
    "MAX_RECORDS",
    "MAX_BIN",
    "MAX_STR",
    "MAX_ID",
    "MAX_TS",
    "ACTIONS",
    "EventRecord",
    "CountRecord",
    "GapRecord",
    "Batch",
    "valid_agent_id",
    "RowBatch",
    "pair_key",
    "MAX_CMD",
    "encode_event",
    "encode_times",
    "encode_batch",
    "event_map",
    "EventPacker",
    "facts_map",
    "unpack",
    "rows_of",
    "decode_batch",
    "decode_rows",
]
