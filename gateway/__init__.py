"""Site gateway: reads serial and MQTT devices, validates, batches into an outbox, uplinks."""
