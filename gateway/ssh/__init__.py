"""The SSH front end: connections, authentication, sessions and their commands."""
