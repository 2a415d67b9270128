"""Redis: the projection, the finalize queues, and the embedded server."""
