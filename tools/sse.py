"""Server-Sent Events over Python's http.client, for the tools that read dmoe's streams
(tools/soak.py, tools/serve_check.py)."""


def data_lines(resp):
    """Yields the payload (bytes, stripped) of each `data:` line of `resp`, an
    http.client.HTTPResponse, as soon as the line has arrived; other lines are skipped.
    The caller stops at b"[DONE]"."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()
