"""Workstation side: read a GGUF header, plan for a device, quantize, write the bundle."""
