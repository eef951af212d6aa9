"""The `cityhub` command: composes the services and runs the local stack."""
