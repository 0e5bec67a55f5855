"""Supervision: the daemon's lifecycle, memory and thermal guards, systemd notify, metrics, logs."""
