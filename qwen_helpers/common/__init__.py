"""Shared by every layer: the one error type, files the kit writes (atomic, never an input), the tiny Qwen, architecture presets."""
