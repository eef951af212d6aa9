"""Tests of the `cityhub` command, its local servers and the database migrations."""
