"""A worker's default task threads (= the jobs it prefetches) follow its batches."""

from core.serving.contracts import BatcherConfig
from workers.__main__ import default_concurrency


def test_text_workers_hold_a_full_batch_per_stream_and_one_more():
    assert default_concurrency("text", BatcherConfig(max_batch_size=128)) == 256
    assert default_concurrency("text", BatcherConfig(max_batch_size=1)) == 2
    # Two streams run two batches while a third gathers.
    assert default_concurrency("text", BatcherConfig(max_batch_size=128, streams=2)) == 384


def test_image_and_audio_workers_keep_at_most_128():
    # Their budgets keep batches far below max_batch_size: more threads would only
    # hold more prepared windows and take more of a burst from the other workers.
    for modality in ("image", "audio"):
        assert default_concurrency(modality, BatcherConfig(max_batch_size=128)) == 128
        assert default_concurrency(modality, BatcherConfig(max_batch_size=16)) == 32
        assert default_concurrency(modality, BatcherConfig(max_batch_size=16, streams=2)) == 48
