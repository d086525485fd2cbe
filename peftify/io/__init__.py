"""Interoperability: PEFT configs in and out (`peft_config`), adapter files in peftify's own
format and PEFT's (`adapters`, written as one change by `files`), torch.export programs and AOTInductor packages (`export`).
Imports neither peft nor transformers.
"""
