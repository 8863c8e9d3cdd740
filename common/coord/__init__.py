"""Coordination in Redis: keys, pending batches, table locks, the backlog, dead letters (and their Lua)."""
