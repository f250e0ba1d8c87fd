"""torch.compile entry points: the "smoothce" backend, Inductor pass registration, inspection."""
