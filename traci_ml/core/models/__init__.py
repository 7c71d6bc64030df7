"""The model definitions: the expert's embedding network and the reducer's Transformer. Plain
torch modules, no sockets; the services, prediction, export and the bench all build them here."""
