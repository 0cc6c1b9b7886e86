"""What a run is, decided once: argument dataclasses, flag checks, precision policy, the method registry, prompt settings."""
