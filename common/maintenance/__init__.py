"""Table maintenance: compaction, snapshot expiry, orphan files, deletes, verification."""
