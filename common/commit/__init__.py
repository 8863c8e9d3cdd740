"""The commit path: group commit of pending files with exactly-once semantics."""
