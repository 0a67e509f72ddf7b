"""Shared by server and clients, Flower-free: run config, data and partitioning, model + LoRA, training loops."""
