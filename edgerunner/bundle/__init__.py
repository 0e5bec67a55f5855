"""The bundle contract: manifest, config.toml settings, systemd unit, write, verify, archive."""
