"""TRACI: Transformer-Reducing Agents Create Intelligence.

One prediction model split across cooperating processes: experts (embedding networks with
Polyak targets), a broker that joins and orders their embeddings, and a reducer Transformer.
"""

__version__ = "0.1.0"
