"""The network over a volume: sliding windows, nnU-Net mode, CPU runtimes, device choice."""
