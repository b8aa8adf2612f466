"""VQGAN+CLIP: text- and image-guided generation with any steerable tokenizer of the family (`vqgan imagine`).

prompts.py (the prompt / story syntax), clip_models.py (CLIP from local files), cutouts.py, losses.py,
latents.py (the tokenizer side), optimise.py (the loop), memory.py (will it fit on the GPU), outputs.py,
run.py (a whole run), cli.py (the command). Nothing is imported here, so `vqgan --help` stays light.
"""
