"""``stable_seed``: every sequence of parts is written its own way, so different keys never share a seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from samflow.seeding import stable_seed


def test_the_seed_is_sha256_of_the_documented_writing():
    digest = hashlib.sha256(b"s2:id" + b"s3:a,b" + b"i2:-7").digest()
    assert stable_seed("id", "a,b", -7) == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("a,b",), ("a", "b")),  # a comma inside a part is not a separator
        ((5,), ("5",)),  # an integer is not its digits as a name
        (("ab", "c"), ("a", "bc")),
        (("id", "x", 1, 0), ("id", "x", 10)),
        ((), ("",)),
    ],
)
def test_different_parts_give_different_seeds(a, b):
    assert stable_seed(*a) != stable_seed(*b)


def test_integers_of_any_type_are_the_same_part():
    assert stable_seed("run", np.int64(3), 4) == stable_seed("run", 3, np.int32(4))
    assert 0 <= stable_seed("run", 3) < 2**63
