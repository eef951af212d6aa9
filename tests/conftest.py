"""The test suite's fixtures, loaded as plugins so that tests in any folder get them by name.

``tests/plugins`` holds them: ``servers``, ``database`` and ``broker`` the
fixtures (private servers, database schemas, broker accounts); ``gateway``,
``ingest`` and ``grafana`` the harnesses, with the helpers tests call and
their own fixtures; ``network`` this machine's own addresses; ``alertmanager``
a private Alertmanager with a webhook receiver and an SMTP sink. The tests are
grouped by the package they test (``tests/gateway/``, ``tests/ingest/``, ...);
``tests/system/`` runs the whole pipeline and ``tests/project/`` checks the
repository itself.
"""

pytest_plugins = [
    "tests.plugins.servers",
    "tests.plugins.database",
    "tests.plugins.broker",
    "tests.plugins.gateway",
    "tests.plugins.ingest",
    "tests.plugins.grafana",
    "tests.plugins.network",
    "tests.plugins.alertmanager",
]
