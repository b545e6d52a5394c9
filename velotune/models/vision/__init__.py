"""Vision-language models: a vision tower and a projector in front of one of velotune's decoders (base.py), one file
per family (llava.py, qwen2_vl.py, idefics3.py), and their checkpoint files (files.py)."""
