"""Data: the dataset every process loads, its split and preprocessing, and the table readers.

- ``dataset``: ``Dataset``, the views (``view_specs``, ``expert_count``: no data read),
  ``load_dataset`` (the one table, every view) and ``load_labels`` (parties: the labels).
- ``tables``: the one-table sources (digits, synthetic, a CSV file) as ``raw_table``.
- ``split``: the one split (``split_index``) and standardisation, shared by the dataset
  and the saved preprocessing; its statistics' rows (``fit_positions``: no validation row).
- ``preprocess``: ``Preprocess``, written to and read from the run directory.
- ``expert``: one expert's own rows (``ExpertData``, ``load_expert_data``).
- ``reader``: the one CSV table reader (``read_csv_table``).
- ``parties``: a party's own CSV or Parquet file, decoded by pyarrow (``read_party``,
  ``read_labels``); imported where it is used, so that importing this package does not
  load pyarrow.
"""

from traci_ml.core.data.dataset import (
    Dataset,
    digits_views,
    expert_count,
    load_dataset,
    load_labels,
    view_specs,
)
from traci_ml.core.data.expert import load_expert_data
from traci_ml.core.data.preprocess import (
    Preprocess,
    checked_table,
    derive_preprocess,
    fmt_cell,
    label_values,
    load_preprocess,
    split_rows,
    write_preprocess,
)
from traci_ml.core.data.reader import read_csv_table
from traci_ml.core.data.split import fit_positions, split_index, standardise
from traci_ml.core.data.tables import PARTIES_NO_TABLE, raw_table

__all__ = [
    "PARTIES_NO_TABLE",
    "Dataset",
    "Preprocess",
    "checked_table",
    "derive_preprocess",
    "digits_views",
    "expert_count",
    "fit_positions",
    "fmt_cell",
    "label_values",
    "load_dataset",
    "load_expert_data",
    "load_labels",
    "load_preprocess",
    "raw_table",
    "read_csv_table",
    "split_index",
    "split_rows",
    "standardise",
    "view_specs",
    "write_preprocess",
]
