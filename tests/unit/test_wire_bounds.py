"""The decoder's memory is bounded by objects, not by bytes (issue 16's
bounded decoding item): a body of one-byte empty maps used to cost ~600 MB
before any schema check; the largest valid batch still decodes."""

from __future__ import annotations

import os
import subprocess
import sys

import msgpack
import pytest

from agent.shared import wire
from agent.shared.errors import WireError

T = 1_790_000_000_000

PROBE = """
import msgpack, resource
from agent.shared import wire
from agent.shared.errors import WireError
n = (8 << 20) // 20003 - 1
body = msgpack.packb({{"v": 1, "events": [[{shape}] * 20000] * n}})
try:
    wire.decode_rows(body)
    print("decoded")
except WireError as e:
    print("refused", e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.parametrize("shape", ["{}", "[]", "-20"])
def test_a_body_of_tiny_objects_is_refused_within_bounded_memory(shape: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(shape=shape)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    verdict, peak_mb = r.stdout.splitlines()
    assert verdict.startswith("refused") and "objects" in verdict, verdict
    assert int(peak_mb) < 200, peak_mb  # was 598 MB for "{}" before the bound


def test_the_largest_valid_batch_still_decodes() -> None:
    detail = {
        "pid": 4242, "ppid": 1, "pname": "php-fpm8.2", "cmd": "php-fpm: pool www", "uid": "33",
        "uname": "www-data", "attr": "exact", "ppname": "php-fpm8.2", "ppexe": b"/usr/sbin/php-fpm8.2",
        "etype": ["change"], "orig": b"/tmp/phpAbC123",
        "file": {"size": 5, "mode": 0o100644, "uid": 33, "gid": 33, "sha256": "ab" * 32, "sample": os.urandom(64),
                 "gone": False},
    }  # fmt: skip
    events = tuple(
        wire.EventRecord(T + i, "rename", b"/usr/sbin/php-fpm8.2", b"/var/www/%d.php" % i, detail)
        for i in range(19_000)  # as many as fit in MAX_BODY
    )
    body = wire.encode_batch(wire.Batch("a" * 32, "b" * 32, 1, "a", "h", T, events))
    assert len(body) <= wire.MAX_BODY
    assert len(wire.decode_rows(body).events) == 19_000
    with pytest.raises(WireError, match="objects"):
        wire.unpack(msgpack.packb([[0] * 20_000] * 61))
