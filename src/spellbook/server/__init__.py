"""The HTTP server: native API (/api/v1), A1111-compatible API (/sdapi/v1), auth, SSE progress."""
