"""TRACI: Transformer-Reducing Agents Create Intelligence.

One prediction model split across cooperating processes: experts (embedding networks with
Polyak targets), a broker that joins and orders their embeddings, and a reducer Transformer.
"""

__version__ = "0.1.0"

__all__ = ["Client", "LocalCluster"]


def __getattr__(name: str):  # lazy: services importing traci_ml.* do not pay for the API
    if name == "LocalCluster":
        from traci_ml.app.api import LocalCluster

        return LocalCluster
    if name == "Client":  # served prediction (docs/serving.md)
        from traci_ml.app.client import Client

        return Client
    raise AttributeError(f"module 'traci_ml' has no attribute {name!r}")
