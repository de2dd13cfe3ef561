"""Worker of tests/test_launching.py: says hello, then hangs (a stand-in for a deadlock)."""

import time

print("worker started, now hanging", flush=True)
time.sleep(3600)
