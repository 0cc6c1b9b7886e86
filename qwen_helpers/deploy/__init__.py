"""Models people run: merge and prove the merge, GGUF through llama.cpp (in a child process), Ollama, the vLLM check."""
