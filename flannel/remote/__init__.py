"""Client/server mode: the /v1 HTTP API shared by the Werkzeug server and the requests client."""
