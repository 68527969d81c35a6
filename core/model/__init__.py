"""The multimodal model: the packed attention core and its CPU kernel, the encoder,
the towers (text: all-MiniLM-L6-v2; image: EfficientNet-Lite0 mapped zero-shot
into the text space; audio: the Whisper speech tower), their front ends, adapters
(fine-tuned model versions), and
``MultimodalModel`` (multimodal.py) that puts them behind one prepare/forward.

Importing this package imports nothing heavy: take what you need from its modules.
"""
