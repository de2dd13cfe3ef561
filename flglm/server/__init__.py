"""The server's side: the endpoint clients reach, the middle stack's compute, and how it serves many clients."""
