"""Simulated device firmware speaking the real serial and MQTT protocols, for CI and demos."""
