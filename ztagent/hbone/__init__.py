"""HBONE: TCP tunnelled as HTTP/2 CONNECT over mutual TLS with SPIFFE identities."""
