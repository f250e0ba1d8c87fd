"""torch.compile entry points: the "smoothce" backends, Inductor pass registration, the Hugging Face
Trainer hook, inspection and its report, the command line and the demo."""

if "." not in __name__:  # imported from a clone's root as a top-level module: _toplevel.py
    from smoothce._toplevel import step_aside

    step_aside(__name__, __file__)
