"""The HTTP transport: OpenAI and Ollama routes over one relay, the listeners, the access guard."""
