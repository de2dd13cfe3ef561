"""How the server serves many clients: one module per ``server.parallelism`` mode."""
