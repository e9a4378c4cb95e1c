"""LoRA files: safetensors intake (validation, hashes, key formats, architecture, metadata) and
generation-free weight comparison."""
