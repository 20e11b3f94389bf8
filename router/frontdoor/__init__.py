"""The front door: everything between a client's bytes and the core — connections, the path
guard, keys, CORS, body limits, request ids, OpenAI-shaped error answers, the HTTP handlers."""
