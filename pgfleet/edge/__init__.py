"""Serverless drivers' protocols (Neon's): SQL over HTTP and Postgres over WebSocket.

A listener beside the proxy. SQL over HTTP runs each request on the pooled listener's server
connections; a WebSocket carries the Postgres protocol into the proxy's own session handling
(direct or pooled). Authentication, routing and waking are the proxy's.
"""
