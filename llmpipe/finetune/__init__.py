"""Fine-tuning: chat data (conversations, preference pairs), SFT and DPO."""
