"""Fleet rollout through Mender: the module-image artifact of a bundle, and the update module."""
