"""SOCKS5 (RFC 1928) for the node agent's SOCKS5 listener: the handshake without I/O
(`handshake`) and the listener protocol that runs it and hands each request on (`listener`)."""
