"""Tests of the fuzz harnesses."""
