"""Tests of the simulator (firmware_sim)."""
