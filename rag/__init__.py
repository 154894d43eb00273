"""kvrag core and serving: model, engine, retrieval, API and CLI."""

import os

# Nothing is ever fetched from a model hub: models load from local paths only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# oneDNN keeps a primitive for every matmul shape it has run, with buffers sized to it: the
# packed linears of a prompt of each new length added ~5.5 MB, so a server's memory grew
# with every distinct prompt length (+330 MB over 60 lengths). 64 each bounds it (+85-145 MB
# over 120 lengths) and still holds the decode steps' few shapes. Read at first use.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
