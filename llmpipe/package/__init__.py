"""Quantize, export and (issue 13) register the trained model: torchao weights, Hugging Face and GGUF exports."""
