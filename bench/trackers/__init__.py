"""What a point reads from the machine: resident set, the CUDA allocator, NVML, energy, device
ceilings, the environment."""
