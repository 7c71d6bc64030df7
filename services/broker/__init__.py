"""The broker: joins expert embeddings into ordered batches for the reducer and routes
gradients back (``main.run`` is the entry point; ``join`` holds the logic, on the base of
``peers``' registration and liveness, ``service`` the sockets). It holds no model and imports
no torch."""
