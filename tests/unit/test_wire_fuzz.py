"""Fuzzing the wire format: whatever bytes arrive, ``wire.decode_batch`` (and
the bounded unpacker under it) either returns a Batch or raises WireError;
nothing else may escape into the collector's handler. A valid batch survives
encode_batch/decode_batch unchanged.

Inputs: random bytes; valid batches mutated (bit flips, truncations, spliced
bytes, repeated slices); msgpack objects built from hypothesis strategies,
both arbitrary and "almost valid" (one field of a valid batch replaced).
Bounded in examples so the file runs in seconds."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.shared import wire
from agent.shared.errors import WireError

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ valid batches

hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
agent_ids = st.text("ABCXYZabcxyz0189._:@-", min_size=1, max_size=128)
ts = st.integers(0, wire.MAX_TS)
small_ts = st.integers(0, 2_000_000_000_000)
names = st.none() | st.binary(min_size=1, max_size=300)
short_text = st.text(max_size=40)


@st.composite
def details(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("pid", "ppid"):
        if draw(st.booleans()):
            out[k] = draw(st.integers(0, (1 << 31) - 1))
    for k in ("pname", "cmd", "uid", "uname", "attr", "ppname"):
        if draw(st.booleans()):
            out[k] = draw(short_text)
    for k in ("orig", "ppexe"):
        if draw(st.booleans()):
            out[k] = draw(st.binary(min_size=1, max_size=100))
    if draw(st.booleans()):
        out["etype"] = draw(st.lists(st.text(max_size=32), max_size=3))
    if draw(st.booleans()):
        facts: dict[str, Any] = {}
        for k in ("size", "mode", "uid", "gid"):
            if draw(st.booleans()):
                facts[k] = draw(ts)
        if draw(st.booleans()):
            facts["sha256"] = draw(hex32.map(lambda h: h * 2))
        if draw(st.booleans()):
            facts["sample"] = draw(st.binary(min_size=1, max_size=64))
        if draw(st.booleans()):
            facts["gone"] = draw(st.booleans())
        out["file"] = facts
    return out


events = st.builds(
    wire.EventRecord, ts=ts, action=st.sampled_from(wire.ACTIONS), exe=names, path=names, detail=details()
)


@st.composite
def count_records(draw: st.DrawFn) -> wire.CountRecord:
    first = draw(small_ts)
    deltas = draw(st.lists(st.integers(0, 10_000_000), max_size=20))
    times = [first]
    for d in deltas:
        times.append(times[-1] + d)
    return wire.CountRecord(draw(names), draw(names), tuple(times))


@st.composite
def gap_records(draw: st.DrawFn) -> wire.GapRecord:
    start = draw(small_ts)
    end = start + draw(st.integers(0, 10_000_000))
    return wire.GapRecord(start, end, draw(st.integers(0, 1 << 40)), draw(st.text(max_size=64)))


@st.composite
def batches(draw: st.DrawFn) -> wire.Batch:
    evs = draw(st.lists(events, max_size=6))
    cts = draw(st.lists(count_records(), max_size=4))
    gps = draw(st.lists(gap_records(), max_size=3))
    if not evs and not cts and not gps:
        gps = [draw(gap_records())]
    return wire.Batch(
        batch_id=draw(hex32),
        epoch=draw(hex32),
        seq=draw(st.integers(1, wire.MAX_TS)),
        agent_id=draw(agent_ids),
        host_name=draw(st.text(min_size=1, max_size=255)),
        sent_at=draw(ts),
        events=tuple(evs),
        counts=tuple(cts),
        gaps=tuple(gps),
    )


# ------------------------------------------------------------------ hostile objects

msgpack_ints = st.integers(-(1 << 63), (1 << 64) - 1)
scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50)
    | st.binary(max_size=50)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
)
hashable_keys = st.text(max_size=12) | st.binary(max_size=8) | msgpack_ints | st.booleans() | st.none()
objects = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(hashable_keys, inner, max_size=6),
    max_leaves=40,
)
field_keys = st.sampled_from(
    ["v", "batch_id", "epoch", "seq", "agent_id", "host_name", "sent_at", "events", "counts", "gaps", "x"]
)


def decodes_or_wire_error(body: bytes) -> None:
    """The property: a Batch, or WireError; the unpacker alike."""
    try:
        batch = wire.decode_batch(body)
    except WireError:
        pass
    else:
        assert isinstance(batch, wire.Batch)
        assert 0 < batch.size() <= wire.MAX_RECORDS
    try:
        wire.unpack(body)
    except WireError:
        pass


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


# ------------------------------------------------------------------ properties


@FUZZ
@given(batches())
def test_a_valid_batch_round_trips_unchanged(batch: wire.Batch) -> None:
    body = wire.encode_batch(batch)
    assert wire.decode_batch(body) == batch
    assert wire.encode_batch(wire.decode_batch(body)) == body


@settings(FUZZ, max_examples=1000)
@given(st.binary(max_size=4096))
def test_random_bytes(body: bytes) -> None:
    decodes_or_wire_error(body)


@FUZZ
@given(batches(), st.data())
def test_mutated_valid_batches(batch: wire.Batch, data: st.DataObject) -> None:
    body = bytearray(wire.encode_batch(batch))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        how = data.draw(st.sampled_from(["flip", "truncate", "splice", "repeat", "byte"]), label="how")
        at = data.draw(st.integers(0, max(0, len(body) - 1)), label="at")
        if how == "flip" and body:
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "truncate":
            del body[at:]
        elif how == "splice":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif how == "repeat":
            end = data.draw(st.integers(at, min(len(body), at + 64)))
            body[at:at] = body[at:end]
        elif body:
            # a type byte of interest: reserved 0xc1, ext, 32-bit lengths, deep nesting
            body[at] = data.draw(st.sampled_from([0xC1, 0xC7, 0xD4, 0xDD, 0xDF, 0xDB, 0xC6, 0x91, 0x81]))
    decodes_or_wire_error(bytes(body))


@FUZZ
@given(objects)
def test_arbitrary_msgpack_objects(obj: Any) -> None:
    decodes_or_wire_error(pack(obj))


@FUZZ
@given(batches(), field_keys, objects)
def test_a_valid_batch_with_one_field_replaced(batch: wire.Batch, key: str, value: Any) -> None:
    doc = msgpack.unpackb(wire.encode_batch(batch), raw=False)
    doc[key] = value
    decodes_or_wire_error(pack(doc))


@FUZZ
@given(batches(), st.data())
def test_a_valid_batch_with_one_record_field_replaced(batch: wire.Batch, data: st.DataObject) -> None:
    doc = msgpack.unpackb(wire.encode_batch(batch), raw=False)
    which = data.draw(st.sampled_from([k for k in ("events", "counts", "gaps") if doc[k]]), label="list")
    i = data.draw(st.integers(0, len(doc[which]) - 1), label="index")
    value = data.draw(objects | st.sampled_from([math.nan, math.inf, -1, 1 << 63, "", b""]), label="value")
    record = doc[which][i]
    if isinstance(record, dict):
        key = data.draw(st.sampled_from([*record.keys(), "file", "pid", "etype", "start"]), label="key")
        record[key] = value
    else:
        record[data.draw(st.integers(0, 2), label="slot")] = value
    decodes_or_wire_error(pack(doc))


def test_deep_nesting_and_huge_length_claims_are_wire_errors() -> None:
    for body in (
        b"\x91" * 5000 + b"\xc0",  # 5000 nested arrays
        b"\x81\xa1a" * 3000 + b"\xc0",  # 3000 nested maps
        b"\xdd\xff\xff\xff\xff",  # array of 2**32-1 entries, no data
        b"\xdf\xff\xff\xff\xff",  # map of 2**32-1 entries
        b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\xd6\xff\xff\xff\xff\xff",  # timestamp ext -1
        b"\xc1",
        b"",
    ):
        decodes_or_wire_error(body)
        try:
            wire.decode_batch(body)
        except WireError:
            continue
        raise AssertionError(f"{body[:8]!r} decoded")


# ------------------------------------------------------------------ the agent's event maps


@pytest.mark.parametrize("cache_max", [1, 2, 1024])
def test_the_event_packer_packs_what_event_map_gives(cache_max: int) -> None:
    """Byte for byte, with process and user objects shared between events
    (as the resolver shares them), cache evictions, and odd values."""
    import random

    from agent.shared.events import ContainerInfo, FileEvent, ProcessInfo, UserInfo

    rng = random.Random(cache_max)

    def pick(*xs: Any) -> Any:
        return rng.choice(xs)

    procs = [
        ProcessInfo(
            pick(None, 0, 5, -1, 1 << 31, (1 << 31) - 1), pick(None, "", "nginx", "ngi\udcffnx", "é" * 5000),
            pick(None, b"", b"/usr/sbin/nginx"), pick(None, 1, -3, 1 << 40),
            pick(None, "", "nginx: worker", "x" * 5000, "\udc80"), None, pick(None, "", "systemd"),
            pick(None, b"", b"/sbin/init"),
            pick(None, ContainerInfo("c" * 64), ContainerInfo("d" * 64, "docker", "web-1", "n" * 300)),
            pick(None, 1, 7, -2, 1 << 31),
        )
        for _ in range(40)
    ]  # a container's process: 18 keys and more (a map16)  # fmt: skip
    users = [UserInfo(pick(None, "", "33"), pick(None, "", "www-data", "w\udc00")) for _ in range(10)]
    packer = wire.EventPacker(cache_max)
    for _ in range(3000):
        ev = FileEvent(
            rng.randint(0, 1 << 53), pick("creation", "rename", "", "x" * 40), pick(None, b"", b"/p", b"\xff" * 300),
            pick(*procs), pick(*users), pick(("creation",), ("change",), ("x" * 40, "y"), ()),
            pick(None, b"", b"/o"), attribution=pick("exact", "cached", "recorded", "uncertain"),
            host_path=pick(None, b"", b"/var/lib/docker/overlay2/x/diff/p"),
        )  # fmt: skip
        doc = wire.event_map(ev)
        assert packer.pack(ev) == (msgpack.packb(doc, use_bin_type=True), len(doc))
        if ev.process.container is not None:
            assert all(len(v) <= 256 for v in doc["ctr"].values())  # what a collector takes
    odd = FileEvent(1, "creation", b"/p", procs[0], users[0], ["creation"])  # a list: unhashable
    assert packer.pack(odd)[0] == msgpack.packb(wire.event_map(odd), use_bin_type=True)
