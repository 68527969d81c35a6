"""The multimodal model: the ``Tower`` protocol (tower.py) that each modality's tower
implements (text: all-MiniLM-L6-v2, text.py; image: EfficientNet-Lite0 mapped zero-shot
into the text space, zeroshot.py; audio: the Whisper speech tower, speech.py and
whisper/), ``MultimodalModel`` (multimodal.py) that runs them from one registry behind
one prepare/forward, the one attention module (attention.py, with its CPU kernel
loaded by cpu_kernels.py), the fused linears (fused.py), the encoder, the front ends and
adapters (fine-tuned model versions).

Importing this package imports nothing heavy: take what you need from its modules.
"""
