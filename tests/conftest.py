"""The test suite's fixtures, loaded as plugins so that tests in any folder get them by name.

``tests/plugins`` holds the fixtures (private servers, database schemas,
broker accounts); the harness modules hold the helpers tests call and are
registered too, so a fixture added to a harness reaches every test.
"""

pytest_plugins = [
    "tests.plugins.servers",
    "tests.plugins.database",
    "tests.plugins.broker",
    "tests.gatewayharness",
    "tests.ingestharness",
    "tests.grafanaharness",
]
