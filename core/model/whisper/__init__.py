"""Whisper tiny.en (speech -> text) on the project's packed attention core.

``tower.SpeechTower`` is the entry point; the rest: ct2.py (model.bin reader),
weights.py (conversion + safetensors cache), frontend.py (log-mel), model.py (encoder,
decoder), decode.py (batched greedy/beam search, teacher-forced scoring), tokens.py.
"""
