"""Diffie-Hellman PSI primitives (traci_ml/core/psi.py): group maths, the alignment protocol,
hostile points, threading determinism and match."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_from_uniform,
    crypto_core_ed25519_is_valid_point,
)

from traci_ml.core.psi import PsiKey, canonical, hash_to_group, match

DOMAIN = b"traci-psi/v1/test-run"


def _points(n: int, seed: int = 0) -> np.ndarray:
    return hash_to_group([b"i:%d" % (seed * 10_000 + i) for i in range(n)], DOMAIN)


def test_canonical_ints_and_strs():
    assert canonical(np.array([7, -3, 0], dtype=np.int16)) == [b"i:7", b"i:-3", b"i:0"]
    assert canonical(np.array([2**64 - 1], dtype=np.uint64)) == [b"i:18446744073709551615"]
    assert canonical(np.array(["7", "é"])) == [b"s:7", "s:é".encode()]
    assert canonical(np.array(["a", "bc"], dtype=object)) == [b"s:a", b"s:bc"]


@pytest.mark.parametrize(
    "bad",
    [np.array([1.0, 2.0]), np.array([True, False]), np.array([b"x"]), np.array(["a", 1], object)],
)
def test_canonical_rejects_other_dtypes(bad):
    with pytest.raises(TypeError, match="float64|bool|S1|object"):
        canonical(bad)


def test_hash_to_group_gives_valid_distinct_points():
    pts = _points(200)
    assert pts.shape == (200, 32) and pts.dtype == np.uint8
    assert all(crypto_core_ed25519_is_valid_point(r.tobytes()) for r in pts)
    assert len({r.tobytes() for r in pts}) == 200
    again = hash_to_group([b"i:%d" % i for i in range(200)], DOMAIN)
    assert np.array_equal(pts, again)


def test_domains_separate():
    ids = [b"i:%d" % i for i in range(100)]
    a = hash_to_group(ids, b"traci-psi/v1/run-a")
    b = hash_to_group(ids, b"traci-psi/v1/run-b")
    assert len({r.tobytes() for r in a} & {r.tobytes() for r in b}) == 0
    assert np.all(match(a, b) == -1)


def test_int_and_str_never_match():
    key = PsiKey.random()
    ints = key.hash_blind(canonical(np.arange(50)), DOMAIN)
    strs = key.hash_blind(canonical(np.array([str(i) for i in range(50)])), DOMAIN)
    assert np.all(match(ints, strs) == -1)


def test_commutativity():
    a, b = PsiKey.random(), PsiKey.random()
    p = _points(64)
    assert np.array_equal(b.blind(a.blind(p)), a.blind(b.blind(p)))
    ids = [b"s:x%d" % i for i in range(64)]
    assert np.array_equal(b.blind(a.hash_blind(ids, DOMAIN)), a.blind(b.hash_blind(ids, DOMAIN)))
    assert np.array_equal(a.hash_blind(ids, DOMAIN), a.blind(hash_to_group(ids, DOMAIN)))
    assert not np.array_equal(a.blind(p), b.blind(p))


def _protocol(x_ids: np.ndarray, y_ids: np.ndarray) -> np.ndarray:
    """Expert holds y_ids (key b), label holder x_ids in global row order (key a)."""
    b, a = PsiKey.random(), PsiKey.random()
    p = b.hash_blind(canonical(y_ids), DOMAIN)  # expert -> label holder
    pa = a.blind(p)  # label holder -> expert, same order
    r = a.hash_blind(canonical(x_ids), DOMAIN)  # label holder -> expert, global order
    rb = b.blind(r)
    return match(pa, rb)


@pytest.mark.parametrize("kind", ["int", "str"])
def test_protocol_recovers_global_positions(kind):
    rng = np.random.default_rng(1)
    universe = rng.choice(10**12, size=2800, replace=False)
    if kind == "str":
        universe = np.array([f"user-{v}" for v in universe])
    shared, only_x, only_y = universe[:700], universe[700:2000], universe[2000:2800]
    x_ids = rng.permutation(np.concatenate([shared, only_x]))  # 2000, label holder's order
    y_ids = rng.permutation(np.concatenate([shared, only_y]))  # 1500, expert's order
    got = _protocol(x_ids, y_ids)
    where = {v: i for i, v in enumerate(x_ids.tolist())}
    want = np.array([where.get(v, -1) for v in y_ids.tolist()], dtype=np.int64)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert int((got >= 0).sum()) == 700
    assert np.array_equal(x_ids[got[got >= 0]], y_ids[got >= 0])


def _mixed_order_point() -> bytes:
    # a subgroup point plus the order-2 point (0, -1): on the curve, not in the subgroup
    p = crypto_core_ed25519_from_uniform(bytes(range(32)))
    return crypto_core_ed25519_add(p, (2**255 - 20).to_bytes(32, "little"))


def _invalid_random() -> bytes:
    rng = np.random.default_rng(5)
    while True:
        cand = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
        if not crypto_core_ed25519_is_valid_point(cand):
            return cand


@pytest.mark.parametrize(
    "bad",
    [
        bytes(32),  # all zero
        b"\x01" + bytes(31),  # identity
        (2**255 - 20).to_bytes(32, "little"),  # (0, -1), order 2
        b"\xff" * 32,  # non-canonical
        _mixed_order_point(),
        _invalid_random(),
    ],
    ids=["zero", "identity", "order2", "noncanonical", "mixed-order", "random"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_blind_rejects_invalid_points_naming_index(bad, threads):
    pts = _points(300).copy()
    pts[17] = np.frombuffer(bad, np.uint8)
    pts[250] = np.frombuffer(bad, np.uint8)
    with pytest.raises(ValueError, match=r"^point 17 is not a valid group element$"):
        PsiKey.random().blind(pts, threads=threads)


def test_blind_first_bad_index_is_in_a_later_chunk():
    pts = _points(300).copy()
    pts[280] = 0
    with pytest.raises(ValueError, match="point 280 "):
        PsiKey.random().blind(pts, threads=2)


def test_blind_rejects_wrong_shape_or_dtype():
    key = PsiKey.random()
    with pytest.raises(ValueError):
        key.blind(np.zeros((3, 31), np.uint8))
    with pytest.raises(TypeError):
        key.blind(_points(3).astype(np.int64))


def test_threads_give_identical_output():
    key = PsiKey.random()
    ids = canonical(np.arange(1000))
    h1 = hash_to_group(ids, DOMAIN, threads=1)
    assert np.array_equal(h1, hash_to_group(ids, DOMAIN, threads=2))
    assert np.array_equal(key.blind(h1, threads=1), key.blind(h1, threads=2))
    assert np.array_equal(key.hash_blind(ids, DOMAIN, threads=1), key.blind(h1, threads=2))
    assert np.array_equal(
        key.hash_blind(ids, DOMAIN, threads=2), key.hash_blind(ids, DOMAIN, threads=1)
    )


def test_empty_inputs():
    key = PsiKey.random()
    empty = hash_to_group([], DOMAIN)
    assert empty.shape == (0, 32)
    assert key.blind(empty).shape == (0, 32)
    assert match(empty, _points(3)).shape == (0,)
    assert np.array_equal(match(_points(3), empty), [-1, -1, -1])


def test_match():
    ref = _points(100)
    own = np.concatenate([ref[[5, 99, 0, 5]], _points(2, seed=1)])
    assert np.array_equal(match(own, ref), [5, 99, 0, 5, -1, -1])


def test_match_rejects_duplicate_reference():
    ref = _points(10)
    ref = np.concatenate([ref, ref[3:4]])
    with pytest.raises(ValueError, match="rows 3 and 10"):
        match(ref[:2], ref)


def test_key_is_secret_and_single_use():
    key = PsiKey.random()
    assert repr(key) == str(key) == "PsiKey(<secret>)"
    assert key._scalar.hex() not in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(ValueError):
        PsiKey(bytes(32))
    with pytest.raises(ValueError):
        PsiKey(b"\xff" * 32)  # not reduced
    assert PsiKey.random()._scalar != PsiKey.random()._scalar
