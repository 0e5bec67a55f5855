"""Clients of a running daemon: HTTP over its unix socket, and MQTT."""
