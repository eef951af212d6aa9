"""pytest plugins of the test suite, registered in the root ``tests/conftest.py``.

Every test module, in whatever folder, gets their fixtures by name without
importing them: ``servers`` starts the private PostgreSQL and Mosquitto,
``database`` hands out connections and per-test schemas, ``broker`` the
broker's admin account, topic prefixes and a provisioner. Helpers that tests
call (not fixtures) stay in the harness modules beside the tests.
"""
