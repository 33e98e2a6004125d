"""WebSocket transport, below Flask: the handshake seam (``handshake``), the sans-I/O
connection protocol (``protocol``) over the frame codec (``frames``, ``deflate``), and its
gevent I/O driver (``connection``, ``readers``). Nothing here imports Flask or the runtime;
the endpoint that admits connections is ``volli.endpoint``."""
