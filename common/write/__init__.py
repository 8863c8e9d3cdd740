"""The write path: a batch of events in, Parquet data files and their DataFiles out."""
