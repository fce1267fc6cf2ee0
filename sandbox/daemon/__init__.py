"""sandboxd: the asyncio server on the Unix socket, auth, tokens, recovery."""
