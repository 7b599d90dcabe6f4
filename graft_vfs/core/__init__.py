"""Pure, I/O-free building blocks shared by the client and the server."""
