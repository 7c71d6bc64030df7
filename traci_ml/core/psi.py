"""Diffie-Hellman private set intersection (PSI) primitives on the prime-order subgroup
of edwards25519, through PyNaCl's libsodium bindings.

This is the ECDH PSI of Meadows (1986) / Huberman-Franklin-Hogg (1999), the construction
openmined-psi implements. We do not use openmined-psi itself: it pins protobuf==6.30.2,
which conflicts with the onnx>=1.23 this project needs (protobuf>=6.31.1), and its result
tells the client only which of its ids are in the intersection, while TRACI also needs the
label holder's row position of each of them.

Protocol (one alignment of an expert against the label holder):

1. The expert holds ids Y and a fresh key b; it sends P = b.hash_blind(Y) in its own
   local order.
2. The label holder holds ids X in its global row order and a fresh key a; it returns
   P^a = a.blind(P) (same order as P) and R = a.hash_blind(X) (global row order).
3. The expert computes R^b = b.blind(R) and match(P^a, R^b): for each of its own ids the
   global row position in X, or -1 where the id is not labelled.

H(y)^(ab) == H(x)^(ab) exactly when x == y (up to collisions of the random oracle), since
scalar multiplication commutes. The label holder learns only |Y|; the expert learns |X|
and which of its own ids are labelled, with their global positions; nobody learns an id it
does not hold (DDH in the prime-order subgroup, the hash modelled as a random oracle).
Security is against semi-honest parties; as in any PSI, a party can test ids it guesses
by putting them in its own set (the label holder sees |Y|, which bounds that). Every point
received from the peer goes through `PsiKey.blind`, which rejects non-canonical,
small-order and mixed-order encodings (libsodium checks subgroup membership), so a hostile
peer cannot learn the key's residue modulo the cofactor. Keys live for one alignment only:
make a new `PsiKey.random()` per run and drop it afterwards (it cannot be pickled). The
`domain` passed to the hash (e.g. b"traci-psi/v1/" + run_id) separates runs, so points
from one run say nothing about another.

Ids are canonicalised by type (`canonical`): the int 7 is b"i:7" and the str "7" is
b"s:7", so they never match. Strings are hashed as given (no Unicode normalisation).

Speed: libsodium calls through cffi release the GIL, so the work is split in chunks over
a ThreadPoolExecutor (`threads` workers, default os.cpu_count(); 1 runs inline). Measured
on the 2-core development box (AMD EPYC, PyNaCl 1.6.2), 20 000 ids, best of 3, microseconds
per element:

    ===============  =========  =========
    operation        1 thread   2 threads
    ===============  =========  =========
    hash_to_group       58.0       30.3
    blind               92.3       47.5
    hash_blind         150.3       79.5
    ===============  =========  =========

(blind is one libsodium scalar multiplication plus its subgroup check; hash_to_group is two
Elligator maps and an addition.) So 1M ids cost about 80 s of hash_blind on 2 cores.
`match` of 20k rows against 20k takes 7.5 ms, of 200k against 1M 0.7 s.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from nacl import exceptions as nacl_exceptions
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_from_uniform,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_noclamp,
)

__all__ = ["PsiKey", "canonical", "hash_to_group", "match"]

POINT_BYTES = 32
_MIN_CHUNK = 64  # below this many elements per worker, threads cost more than they save
_DOMAIN_PERSON = b"traci-psi-domain"  # blake2b personalisation, exactly 16 bytes


def canonical(ids: np.ndarray) -> list[bytes]:
    """Each id's canonical bytes: b"i:" + decimal for integers, b"s:" + utf-8 for str."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {arr.shape}")
    kind = arr.dtype.kind
    if kind in "iu":
        return [b"i:%d" % v for v in arr.tolist()]
    if kind == "U":
        return [b"s:" + v.encode("utf-8") for v in arr.tolist()]
    if kind == "O":
        out = []
        for i, v in enumerate(arr.tolist()):
            if not isinstance(v, str):
                raise TypeError(
                    f"ids of dtype object must all be str; id {i} is {type(v).__name__}"
                )
            out.append(b"s:" + v.encode("utf-8"))
        return out
    raise TypeError(f"ids must be integers or str, got dtype {arr.dtype}")


def _threads(threads: int | None) -> int:
    n = (os.cpu_count() or 1) if threads is None else threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    return n


def _chunked(fn: Callable[[int, int], bytes], n: int, threads: int | None) -> np.ndarray:
    """Run fn(start, stop) -> bytes over [0, n) in ordered chunks; (n, 32) uint8 result.

    The chunks' results are joined in order, so a chunk's exception surfaces only after
    every earlier chunk succeeded: the first failing element in input order wins.
    """
    workers = min(_threads(threads), max(1, n // _MIN_CHUNK))
    if workers == 1:
        out = fn(0, n)
    else:
        bounds = [n * k // workers for k in range(workers + 1)]
        buf = bytearray()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="psi") as pool:
            for part in pool.map(fn, bounds[:-1], bounds[1:]):
                buf += part
        out = bytes(buf)
    return np.frombuffer(out, dtype=np.uint8).reshape(n, POINT_BYTES)


def _id_hasher(domain: bytes) -> hashlib.blake2b:
    if not isinstance(domain, bytes | bytearray):
        raise TypeError(f"domain must be bytes, got {type(domain).__name__}")
    key = hashlib.blake2b(bytes(domain), digest_size=64, person=_DOMAIN_PERSON).digest()
    return hashlib.blake2b(digest_size=64, key=key)


def _check_ids(ids: Sequence[bytes]) -> list[bytes]:
    ids = list(ids)
    for i, v in enumerate(ids):
        if not isinstance(v, bytes):
            raise TypeError(f"id {i} is {type(v).__name__}, not bytes (see canonical())")
    return ids


def _to_group(base: hashlib.blake2b, ident: bytes) -> bytes:
    h = base.copy()
    h.update(ident)
    d = h.digest()
    return crypto_core_ed25519_add(
        crypto_core_ed25519_from_uniform(d[:32]), crypto_core_ed25519_from_uniform(d[32:])
    )


def hash_to_group(ids: list[bytes], domain: bytes, *, threads: int | None = None) -> np.ndarray:
    """Hash each id to the prime-order subgroup: (n, 32) uint8 point encodings.

    h = blake2b(id, digest_size=64, key derived from domain); the point is
    from_uniform(h[:32]) + from_uniform(h[32:]), the two-map random-oracle construction
    of hash_to_curve (libsodium's from_uniform clears the cofactor).
    """
    ids = _check_ids(ids)
    base = _id_hasher(domain)

    def work(start: int, stop: int) -> bytes:
        return b"".join([_to_group(base, ids[i]) for i in range(start, stop)])

    return _chunked(work, len(ids), threads)


class _BadPoint(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _bad_point(index: int) -> ValueError:
    return ValueError(f"point {index} is not a valid group element")


class PsiKey:
    """A secret scalar of the prime-order subgroup, for one alignment only."""

    __slots__ = ("_scalar",)

    def __init__(self, scalar: bytes) -> None:
        if not isinstance(scalar, bytes) or len(scalar) != 32:
            raise ValueError("a PsiKey scalar is 32 bytes")
        if crypto_core_ed25519_scalar_reduce(scalar + bytes(32)) != scalar:
            raise ValueError("a PsiKey scalar must be reduced modulo the group order")
        if scalar == bytes(32):
            raise ValueError("a PsiKey scalar must not be zero")
        self._scalar = scalar

    @classmethod
    def random(cls) -> PsiKey:
        while True:
            scalar = crypto_core_ed25519_scalar_reduce(os.urandom(64))
            if scalar != bytes(32):  # probability 2^-252, but never zero
                return cls(scalar)

    def __repr__(self) -> str:
        return "PsiKey(<secret>)"

    def __reduce__(self):
        raise TypeError("a PsiKey is not serialisable: keys live for one alignment only")

    def blind(self, points: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """Each point times the secret scalar; points come from a possibly hostile peer.

        Raises ValueError naming the first index whose encoding is not a canonical point
        of the prime-order subgroup other than the identity.
        """
        if not isinstance(points, np.ndarray) or points.dtype != np.uint8:
            raise TypeError("points must be a uint8 numpy array")
        if points.ndim != 2 or points.shape[1] != POINT_BYTES:
            raise ValueError(f"points must have shape (n, 32), got {points.shape}")
        raw = np.ascontiguousarray(points).tobytes()
        scalar = self._scalar

        def work(start: int, stop: int) -> bytes:
            out = []
            for i in range(start, stop):
                try:
                    out.append(crypto_scalarmult_ed25519_noclamp(scalar, raw[i * 32 : i * 32 + 32]))
                except nacl_exceptions.RuntimeError:
                    raise _BadPoint(i) from None
            return b"".join(out)

        try:
            return _chunked(work, len(points), threads)
        except _BadPoint as e:
            raise _bad_point(e.index) from None

    def hash_blind(
        self, ids: list[bytes], domain: bytes, *, threads: int | None = None
    ) -> np.ndarray:
        """blind(hash_to_group(ids, domain)), fused in one pass."""
        ids = _check_ids(ids)
        base = _id_hasher(domain)
        scalar = self._scalar

        def work(start: int, stop: int) -> bytes:
            out = []
            for i in range(start, stop):
                try:
                    out.append(crypto_scalarmult_ed25519_noclamp(scalar, _to_group(base, ids[i])))
                except nacl_exceptions.RuntimeError:  # h(id) is the identity: p ~ 2^-252
                    raise _BadPoint(i) from None
            return b"".join(out)

        try:
            return _chunked(work, len(ids), threads)
        except _BadPoint as e:
            raise _bad_point(e.index) from None


def _rows(a: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 numpy array")
    if a.ndim != 2 or a.shape[1] != POINT_BYTES:
        raise ValueError(f"{name} must have shape (n, 32), got {a.shape}")
    return np.ascontiguousarray(a).view(np.dtype((np.void, POINT_BYTES))).ravel()


def match(own: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each row of own, its index in reference, or -1: int64 (n,).

    Sorts reference once and binary-searches own in it: O((n + N) log N).
    Duplicate rows in reference raise ValueError (they would make the answer ambiguous).
    """
    mine = _rows(own, "own")
    ref = _rows(reference, "reference")
    order = np.argsort(ref, kind="stable")
    sorted_ref = ref[order]
    if len(sorted_ref) > 1:
        dup = np.flatnonzero(sorted_ref[1:] == sorted_ref[:-1])
        if len(dup):
            i, j = sorted(order[dup[0] : dup[0] + 2].tolist())
            raise ValueError(f"reference rows {i} and {j} are equal")
    out = np.full(len(mine), -1, dtype=np.int64)
    if len(sorted_ref) == 0 or len(mine) == 0:
        return out
    pos = np.searchsorted(sorted_ref, mine)
    inside = pos < len(sorted_ref)
    hit = np.zeros(len(mine), dtype=bool)
    hit[inside] = sorted_ref[pos[inside]] == mine[inside]
    out[hit] = order[pos[hit]]
    return out
