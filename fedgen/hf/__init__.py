"""Hugging Face checkpoints that a site holds on its own disk: reading and pinning them
(`checkpoint`), their tokenizers (`tokenizer`), LoRA through peft and the classifier
fedgen trains (`classifier`), and random checkpoints of real architectures (`random`).

Nothing here ever reaches a hub: fedgen sets ``HF_HUB_OFFLINE`` when imported and every
load passes ``local_files_only``.
"""
