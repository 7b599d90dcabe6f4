"""The graft server: an HTTP service that keeps volumes in object storage.

``python -m server --store DIR`` runs it; ``server.app.create_app`` builds the ASGI
app for tests and embedding.
"""
