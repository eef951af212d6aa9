"""Tests of grafana."""
