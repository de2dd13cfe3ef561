"""What the client and the server share, and nothing else: the message kinds and their tensor
layout (``protocol``), the checks every received tensor passes (``messages``), the endpoint's
call surface (``surface``) and the transports that make a client's calls (``transport``)."""
