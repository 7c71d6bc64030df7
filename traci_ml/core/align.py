"""Rows where they live: the label holder's global row order, and each expert's map from it
to its own rows (docs/parties.md). No sockets: the services move these arrays over ALIGN.

The label holder (the reducer) sorts its labelled ids, splits them by the run's seed exactly
as the one-table mode splits a table's rows, and numbers them: train rows ``0..n_train-1``,
then test rows ``n_train..n_train+n_test-1``. The schedule is a pure function of the seed
over these global positions. An expert learns, for each of its own rows, the global position
of its id or -1 (unlabelled), in one of two ways:

- ``plain``: it sends its ids; the label holder answers with ``positions(global_ids, ids)``.
- ``psi``: private set intersection (``traci_ml.core.psi``); only blinded group elements travel.

From the positions the expert builds ``RowMap``: global train/test index -> local row, or -1
where it lacks the row (its token is masked for that row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traci_ml import proto
from traci_ml.core.errors import DataError

ABSENT = -1


def split_order(n: int, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``n`` rows: the one-table mode's split (data._split)."""
    order = np.random.default_rng([seed, 0xDA7A]).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def validation_split(n_train: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val): positions in the train split (``0..n_train-1``, the label holder's train
    rows in global order) of the rows training draws its batches from and of the validation
    rows model selection scores, both sorted. A pure function of the seed over the train
    split's positions, so every process carves the same rows without a message: the one
    table's processes and, in a parties run, every party once aligned (its ``RowMap`` maps
    global train rows, whatever order its file holds them in). ``val_fraction`` 0: no
    validation rows. Never a test row: the test split is cut first (``split_order``)."""
    every = np.arange(n_train, dtype=np.int64)
    if val_fraction <= 0:
        return every, every[:0]
    order = np.random.default_rng([seed, 0x7A11D]).permutation(n_train)
    n_val = min(max(1, int(round(n_train * val_fraction))), n_train - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass(frozen=True)
class GlobalRows:
    """The label holder's rows in global order: ``ids[g]`` is global row g (train, then
    test); ``source[g]`` its row in the label file."""

    ids: np.ndarray
    source: np.ndarray  # (n,) int64 rows of the label table
    n_train: int
    n_test: int

    @property
    def train_ids(self) -> np.ndarray:
        return self.ids[: self.n_train]

    @property
    def test_ids(self) -> np.ndarray:
        return self.ids[self.n_train :]


def global_rows(ids: np.ndarray, seed: int, test_fraction: float) -> GlobalRows:
    """Sort the labelled ids (so the file's row order does not matter), then split them by
    the seed: the same rows, and the same split, wherever each party's file has them."""
    by_id = np.argsort(ids, kind="stable")
    train, test = split_order(len(ids), seed, test_fraction)
    if len(train) < 2:
        raise DataError(f"only {len(train)} labelled training rows after a {test_fraction} "
                        "test split")  # fmt: skip
    source = np.concatenate([by_id[train], by_id[test]]).astype(np.int64)
    return GlobalRows(ids[source], source, len(train), len(test))


class IdIndex:
    """Finds ids among a table's (unique) ids: ``find(ids)`` -> row of each, or -1."""

    def __init__(self, ids: np.ndarray) -> None:
        self.order = np.argsort(ids, kind="stable")
        self.ranked = ids[self.order]

    def find(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if len(self.ranked) == 0 or len(ids) == 0:
            return np.full(len(ids), ABSENT, dtype=np.int64)
        if (ids.dtype.kind in "iu") != (self.ranked.dtype.kind in "iu"):
            return np.full(len(ids), ABSENT, dtype=np.int64)  # int ids never match str ids
        at = np.minimum(np.searchsorted(self.ranked, ids), len(self.ranked) - 1)
        hit = self.ranked[at] == ids
        return np.where(hit, self.order[at], ABSENT).astype(np.int64)


def positions(global_ids: np.ndarray, own_ids: np.ndarray) -> np.ndarray:
    """For each of ``own_ids``, its index in ``global_ids`` (unique), or -1: int64 (n,)."""
    return IdIndex(global_ids).find(own_ids)


@dataclass(frozen=True)
class RowMap:
    """An expert's map from the schedule's rows to its own: ``train[i]`` is the local row
    of train row i (-1: absent), likewise ``test``. ``None`` maps: every row is the expert's
    own row of the same index (the one-table mode)."""

    train: np.ndarray | None
    test: np.ndarray | None
    n_train: int
    n_test: int

    @classmethod
    def identity(cls, n_train: int, n_test: int) -> RowMap:
        return cls(None, None, n_train, n_test)

    @classmethod
    def from_positions(cls, pos: np.ndarray, n_train: int, n_test: int) -> RowMap:
        """``pos[local]``: the global position of each own row (-1: unlabelled)."""
        pos = np.asarray(pos, dtype=np.int64)
        if pos.size and (pos.min() < ABSENT or pos.max() >= n_train + n_test):
            raise DataError(f"alignment answer has positions outside [-1, {n_train + n_test})")
        # int32 local rows while they fit: the map is per label row, so it is the larger one
        index = np.int32 if len(pos) < np.iinfo(np.int32).max else np.int64
        labelled = np.flatnonzero(pos >= 0).astype(index, copy=False)
        full = np.full(n_train + n_test, ABSENT, dtype=index)
        full[pos[labelled]] = labelled  # a repeated position overwrites: fewer rows land
        if np.count_nonzero(full >= 0) != len(labelled):
            raise DataError("alignment answer maps two of this party's rows to one label row")
        return cls(full[:n_train], full[n_train:], n_train, n_test)

    def lookup(self, source: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(local rows, present mask or None when all present) of schedule rows ``rows`` of
        the train split (``source`` "train": train and validation steps) or of the test
        split (any other); an absent row's local index is 0 (never read)."""
        table = self.train if source == "train" else self.test
        if table is None:
            return rows, None
        local = table[rows]
        present = local >= 0
        if present.all():
            return local, None
        return np.where(present, local, 0), present

    def held(self) -> tuple[int, int]:
        """(train rows held, test rows held)."""
        if self.train is None or self.test is None:
            return self.n_train, self.n_test
        return int((self.train >= 0).sum()), int((self.test >= 0).sum())

    def train_rows(self) -> np.ndarray | None:
        """Local rows of the held train rows (None: the identity map)."""
        return None if self.train is None else self.train[self.train >= 0]


# ---- on the wire (ALIGN) ----------------------------------------------------------------


def psi_domain(run_id: str) -> bytes:
    return b"traci-psi/v1/" + run_id.encode()


def ids_tensors(ids: np.ndarray) -> tuple[proto.Tensor, ...]:
    """Ids as ALIGN tensors: int64[n] as they are; text as Arrow lays strings out, int64
    offsets[n + 1] into one uint8 buffer of UTF-8."""
    if ids.dtype.kind in "iu":
        return (proto.Tensor.from_numpy(np.ascontiguousarray(ids, dtype="<i8")),)
    encoded = [str(i).encode() for i in ids.tolist()]
    offsets = np.zeros(len(encoded) + 1, dtype="<i8")
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return proto.Tensor.from_numpy(offsets), proto.Tensor.from_numpy(data)


def ids_from_tensors(tensors: tuple[proto.Tensor, ...], id_type: str) -> np.ndarray:
    """The inverse of ``ids_tensors``; a malformed payload is a DataError naming it."""
    specs = [f"{t.dtype}{list(t.shape)}" for t in tensors]
    if id_type == "int":
        if len(tensors) != 1 or tensors[0].dtype != "int64" or len(tensors[0].shape) != 1:
            raise DataError(f"int ids arrive as int64[n], got {specs}")
        return tensors[0].numpy()
    if (
        len(tensors) != 2
        or tensors[0].dtype != "int64"
        or tensors[1].dtype != "uint8"
        or len(tensors[0].shape) != 1
        or len(tensors[1].shape) != 1
    ):
        raise DataError(f"str ids arrive as int64[n + 1] offsets and uint8[bytes], got {specs}")
    offsets, data = tensors[0].numpy(), tensors[1].buffer
    if (
        not len(offsets)
        or offsets[0] != 0
        or offsets[-1] != len(data)
        or (np.diff(offsets) < 0).any()
    ):
        raise DataError("str ids: offsets do not cut the buffer into strings")
    try:
        cuts = offsets.tolist()
        return np.array([bytes(data[a:b]).decode() for a, b in zip(cuts, cuts[1:], strict=False)])
    except UnicodeDecodeError:
        raise DataError("str ids are not UTF-8") from None
