"""Device registry and provisioning, the field technicians' side: register, assign, revoke."""
