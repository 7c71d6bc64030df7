"""Helpers shared by the tests, imported as ``tests.helpers.<module>``.

The repository root is on ``sys.path`` through pytest's ``pythonpath`` setting
(pyproject.toml); a test that starts Python in a subprocess and needs a helper there
(``hostile``, ``fuzz_run``) puts the root on that process's ``PYTHONPATH`` or uses ``-m``
from the root.

- ``support``: free loopback ports, ``deep_update``, a ``FakeBroker`` ROUTER
- ``broker_net``: a real BrokerService on loopback and ``recv`` from its sockets
- ``cluster``: a ``traci up`` run driven from a test
- ``fuzzing``, ``fuzz_proxy``, ``fuzz_run``: the malformed-message fuzz scenario
- ``hostile``: an expert network that poisons what it sends (attack tests)
- ``netns``: network namespaces for the off-loopback run
- ``recorder``: a man-in-the-middle that records what the peers say
- ``middleman``: what ``recorder`` and ``fuzz_proxy`` share: the broker's ports, stood in
- ``deploytools``, ``invocations``, ``compose_env``: the deployment tests' pieces
"""
