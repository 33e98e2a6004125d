"""WebSocket transport: flask-sock glue, connection send queues, the guarded socket."""
