"""Typer command groups of the `cityhub` command, one module per group."""
