"""One adapter per provider behind the interface in adapters.base."""
