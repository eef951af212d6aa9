"""Tests of the repository itself: packaging, locks, compose, scripts, docs, test fixtures."""
