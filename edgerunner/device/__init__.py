"""On the device: detect a profile, install a bundle, benchmark it."""
