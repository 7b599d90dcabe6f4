"""What bounds a server's memory and time per client: the defaults of its limits.

Kept apart from the modules that enforce them so the command line can show them
without importing the server.
"""

from __future__ import annotations

# A client sends its request headers in one go: one that has not finished them after
# this long is a slow (or malicious) client, and its connection is closed.
DEFAULT_HEADER_TIMEOUT = 10.0
# The most a request body may take to arrive in full, from the end of its headers. A
# client's pushes are at most about 9 MiB per request: 60 s is 150 KB/s.
DEFAULT_BODY_TIMEOUT = 60.0
# Open connections at once. Past it, the connection waiting longest for its request
# headers is closed to make room, so idle or slow connections can never lock out a
# request; without one to close, the new connection is answered 503.
DEFAULT_MAX_CONNECTIONS = 1000
# Page maps kept in memory at once (least recently used dropped first): each costs
# memory in proportion to its volume's page count; reloading one is a checkpoint read.
MAX_LOADED_VOLUMES = 1000
# Seconds a presigned URL of a direct read stays valid (a client asks for fresh ones
# when they expire), and SigV4's own limit.
DEFAULT_DIRECT_EXPIRY = 15 * 60
MAX_DIRECT_EXPIRY = 7 * 24 * 3600
