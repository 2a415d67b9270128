"""The write-ahead log: record codec, segment reading, the writer, snapshots."""
