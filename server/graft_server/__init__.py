"""The graft server: an HTTP service that keeps volumes in object storage.

``graft server --store DIR`` (or ``python -m graft_server``) runs it;
``graft_server.app.create_app`` builds the ASGI
app for tests and embedding.
"""
