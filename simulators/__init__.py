"""Local stand-ins for each provider API, speaking its real wire protocol on loopback."""
