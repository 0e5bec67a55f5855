"""The HTTP transport: the OpenAI app and server, the access guard, Ollama's API."""
