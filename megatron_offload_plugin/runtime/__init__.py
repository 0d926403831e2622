"""Executes schedules on Megatron-core model chunks: B/W split, p2p, the step loop."""
