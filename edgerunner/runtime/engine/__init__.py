"""The engine room, the one place llama.cpp runs: loading, batching, sampling, grammars."""
