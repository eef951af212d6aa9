"""Tests of the whole pipeline under faults."""
