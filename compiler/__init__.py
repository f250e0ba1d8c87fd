"""torch.compile entry points: the "smoothce" backends, Inductor pass registration, the Hugging Face
Trainer hook, inspection and its report, the command line and the demo."""
