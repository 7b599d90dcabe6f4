"""The client: the local store, the server client, volumes and their sync, the VFS."""
