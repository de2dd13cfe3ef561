"""FedAvg of the client blocks: the vector that is averaged, the average, pairwise masking and the server's rounds.

Pure math and bookkeeping: nothing here imports RPC, client or server code."""
