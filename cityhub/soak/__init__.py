"""The fault-schedule soak behind `cityhub soak`: schedules, the link cutter, the runner."""
