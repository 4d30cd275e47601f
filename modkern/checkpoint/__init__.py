"""Hugging Face checkpoint folders: safetensors reads, the folder layout, the shard writer,
atomic publication, the recipe, and the streaming (and distributed) checkpoint merge."""
