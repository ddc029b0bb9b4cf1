"""app.hashing: HMAC-SHA256 that keeps the GIL (why: app/hashing.py)."""

from __future__ import annotations

import hashlib
import hmac
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from app.hashing import hmac_sha256
from app.signature import sign
from app.storage.lifecycle import tombstone_hash

Digest = Callable[[bytes, bytes], bytes]


@pytest.fixture
def switch_interval() -> Iterator[None]:
    # Long enough that no forced switch lands within a few digests: another thread runs
    # during them only if a digest lets go of the GIL.
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def other_thread_ran_during(digest: Digest) -> bool:
    """Whether a thread that wants the GIL all the time got it while `digest` ran."""
    count = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        while count == 0:
            time.sleep(0.001)
        before = count
        # Many digests: a release is a chance for the spinner, which the OS may not take
        # every time (under load it is not always on a core at that moment).
        for i in range(500):
            digest(b"key", b"wamid.%d" % i)
            if count != before:
                return True
        return False
    finally:
        stop.set()
        spinner.join()


def test_hmac_sha256_keeps_the_gil(switch_interval: None) -> None:
    # First the one-call form it replaces, which lets go of the GIL at every digest: the
    # method must see that, or it proves nothing here. On a machine too loaded for the
    # spinner to be on a core when the GIL is let go, it cannot.
    if not other_thread_ran_during(lambda key, message: hmac.digest(key, message, "sha256")):
        pytest.skip("the machine is too busy to see a GIL release happen")
    assert not other_thread_ran_during(hmac_sha256)


def test_the_same_digests_as_before() -> None:
    key, message = b"secret", b'{"message_id":"m1"}'
    assert hmac_sha256(key, message) == hmac.digest(key, message, "sha256")
    assert sign(message, key) == hmac.new(key, message, hashlib.sha256).hexdigest()
    # Tombstones already stored keep matching.
    assert tombstone_hash(key, "m1") == hmac.digest(key, b"m1", "sha256")[:16]
