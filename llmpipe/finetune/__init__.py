"""Fine-tuning: chat data, SFT and DPO."""
