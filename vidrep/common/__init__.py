"""Helpers every layer may use (atomic I/O, logger modes, config checks); nothing here imports the
rest of vidrep, so any package can depend on it without a cycle."""
