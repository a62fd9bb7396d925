"""File formats: safetensors read/write (F8-capable, memory-mapped)."""
