"""Interoperability: PEFT configs in and out (`peft_config`), adapter files in peftify's own
format and PEFT's (`adapters`). Imports neither peft nor transformers.
"""
