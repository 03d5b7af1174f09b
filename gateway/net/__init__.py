"""Sockets that SSH and HTTP both use: bind, accept, the PROXY protocol."""
