"""gpuhop: the daemon and everything that is not provider-specific."""
